#!/usr/bin/env bash
# Assembles the regcache container image as an OCI image layout, without a container engine:
# one layer holding the static binary and the CA bundle, the same image the Dockerfile builds
# (non-root user 65532, no shell, entrypoint /regcache). Needs no root: owners are set in the tar.
#
#   image/build-oci-layout.sh BINARY LAYOUT_DIR [TAG]
#
# BINARY must be statically linked (build it with
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
#     --target x86_64-unknown-linux-gnu
# ); set ALLOW_DYNAMIC=1 to package a dynamic one (tests only: it would not start in the image).
# The layout is reproducible: the same binary gives the same digests. Push it with
#   skopeo copy --preserve-digests oci:LAYOUT_DIR:TAG docker://REGISTRY/regcache:TAG
set -euo pipefail

binary=${1:?usage: build-oci-layout.sh BINARY LAYOUT_DIR [TAG]}
layout=${2:?usage: build-oci-layout.sh BINARY LAYOUT_DIR [TAG]}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -n1)
tag=${3:-$version}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

[ -x "$binary" ] || { echo "not an executable: $binary" >&2; exit 1; }
[ -f "$ca_bundle" ] || { echo "no CA bundle at $ca_bundle (apt-get install ca-certificates)" >&2; exit 1; }
if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
    if [ "${ALLOW_DYNAMIC:-}" != 1 ]; then
        echo "$binary is dynamically linked; build it with -C target-feature=+crt-static" >&2
        exit 1
    fi
fi
case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) echo "unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/etc/ssl/certs" "$root/etc/regcache" "$root/var/lib/regcache"
install -m 0755 "$binary" "$root/regcache"
install -m 0644 "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
# Everything root's, but the cache directory the non-root user writes to (when no volume is
# mounted there). Fixed order, owners and times: the layer's digest depends only on contents.
chmod 0755 "$root" "$root/etc" "$root/etc/ssl" "$root/etc/ssl/certs" "$root/etc/regcache" \
    "$root/var" "$root/var/lib" "$root/var/lib/regcache"
reproducible=(--sort=name --mtime=@0 --numeric-owner --format=posix
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
tar --create --file "$work/layer.tar" --directory "$root" "${reproducible[@]}" \
    --owner=0 --group=0 --exclude=./var/lib/regcache ./regcache ./etc ./var
tar --append --file "$work/layer.tar" --directory "$root" "${reproducible[@]}" \
    --owner=65532 --group=65532 --no-recursion ./var/lib/regcache
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n "$work/layer.tar"

rm -rf "$layout"
mkdir -p "$layout/blobs/sha256"
# Moves a file into the layout as a blob; prints its digest and size.
put_blob() {
    local digest size
    digest=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$digest"
    echo "$digest $size"
}
read -r layer_digest layer_size < <(put_blob "$work/layer.tar.gz")

printf '%s' "{\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":{\"User\":\"65532:65532\",\"Env\":[\"REGCACHE_CONFIG=/etc/regcache/regcache.yaml\"],\"Entrypoint\":[\"/regcache\"],\"Cmd\":[\"serve\"],\"WorkingDir\":\"/var/lib/regcache\",\"ExposedPorts\":{\"5000/tcp\":{}},\"Labels\":{\"org.opencontainers.image.title\":\"regcache\",\"org.opencontainers.image.version\":\"$version\"}},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\"history\":[{\"created_by\":\"image/build-oci-layout.sh\"}]}" >"$work/config.json"
read -r config_digest config_size < <(put_blob "$work/config.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_digest\",\"size\":$config_size},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}" >"$work/manifest.json"
read -r manifest_digest manifest_size < <(put_blob "$work/manifest.json")

printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest_digest\",\"size\":$manifest_size,\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"},\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" >"$layout/index.json"
echo "sha256:$manifest_digest"
