#!/usr/bin/env python3
"""Writes the benchmark's test images as an OCI image layout, ready for `skopeo copy oci:...`.

Layers are real tar.gz streams (so containers/image sees gzip and pushes them unchanged) whose
payload is pseudo-random bytes, stored with deflate level 0: incompressible content, and no
compression cost to generate or to push. Every run uses a fresh seed, so nothing can come from an
earlier run's cache.

    python3 benches/oci_images.py LAYOUT_DIR [--quick]

writes LAYOUT_DIR (an OCI layout with one ref per image) and prints the refs it holds as JSON.
"""

import hashlib
import json
import os
import random
import sys
import tarfile
import time
import zlib

MiB = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# ref in the layout -> (repository, tag) on the upstream
IMAGES = {
    "big": "bench/big:latest",  # one 512 MiB layer
    "small": "bench/small:latest",  # one 4 KiB layer
    "layers50": "bench/layers50:latest",  # 50 layers of 1 MiB
    "multi": "bench/multi:latest",  # an index over linux/amd64 and linux/arm64
}


class _GzipTarSink:
    """A file-like object for tarfile's stream mode: hashes the tar (the diff_id), gzips it at
    level 0 and writes and hashes the result (the layer digest)."""

    def __init__(self, path):
        self.out = open(path, "wb")
        self.tar_hash = hashlib.sha256()
        self.gz_hash = hashlib.sha256()
        self.gz = zlib.compressobj(0, zlib.DEFLATED, 31)  # wbits 31: gzip framing
        self.size = 0

    def _emit(self, data):
        if data:
            self.out.write(data)
            self.gz_hash.update(data)
            self.size += len(data)

    def write(self, data):
        self.tar_hash.update(data)
        self._emit(self.gz.compress(data))
        return len(data)

    def close(self):
        self._emit(self.gz.flush())
        self.out.close()


class _RandomFile:
    """`size` pseudo-random bytes, read in whatever pieces tarfile asks for."""

    def __init__(self, rng, size):
        self.rng = rng
        self.left = size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


class Layout:
    def __init__(self, root):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        self.rng = random.Random(time.time_ns() ^ os.getpid())
        self.refs = []
        self.made = 0

    def put(self, media_type, data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    def put_json(self, media_type, value):
        return self.put(media_type, json.dumps(value, indent=2).encode())

    def layer(self, payload_size):
        """A tar.gz layer holding one file of `payload_size` random bytes; returns (descriptor,
        diff_id)."""
        self.made += 1
        tmp = os.path.join(self.blobs, f"tmp-{self.made}")
        sink = _GzipTarSink(tmp)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"bench/payload-{self.made}.bin")
            info.size = payload_size
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, _RandomFile(self.rng, payload_size))
        sink.close()
        digest = sink.gz_hash.hexdigest()
        os.replace(tmp, os.path.join(self.blobs, digest))
        desc = {"mediaType": OCI_LAYER, "digest": "sha256:" + digest, "size": sink.size}
        return desc, "sha256:" + sink.tar_hash.hexdigest()

    def image(self, arch, layers):
        config = self.put_json(
            OCI_CONFIG,
            {
                "created": "1970-01-01T00:00:00Z",
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            },
        )
        return self.put_json(
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config,
                "layers": [desc for desc, _ in layers],
            },
        )

    def index(self, platforms):
        manifests = []
        for arch, desc in platforms:
            entry = dict(desc)
            entry["platform"] = {"architecture": arch, "os": "linux"}
            manifests.append(entry)
        return self.put_json(
            OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        )

    def tag(self, ref, desc):
        entry = dict(desc)
        entry["annotations"] = {REF_NAME: ref}
        self.refs.append(entry)

    def finish(self):
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.refs}, f, indent=2)


def build(root, big_size=512 * MiB):
    layout = Layout(root)
    layout.tag("big", layout.image("amd64", [layout.layer(big_size)]))
    layout.tag("small", layout.image("amd64", [layout.layer(4096)]))
    layout.tag("layers50", layout.image("amd64", [layout.layer(MiB) for _ in range(50)]))
    platforms = [(arch, layout.image(arch, [layout.layer(64 * 1024)])) for arch in ("amd64", "arm64")]
    layout.tag("multi", layout.index(platforms))
    layout.finish()
    return IMAGES


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(build(sys.argv[1])))
