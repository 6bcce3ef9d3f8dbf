#!/usr/bin/env bash
# End-to-end benchmark: regcache against CNCF Distribution in proxy mode (Debian's
# docker-registry, the pull-through cache people run today) and against nginx serving the same
# blob files with sendfile (the ceiling for cached bytes over loopback HTTP), in one run.
#
#   bash benches/run.sh            # full run: 3 rounds of every scenario, about 10-15 minutes
#   bash benches/run.sh --quick    # 1 round of scenarios 1-4 with short measurements, ~2-3 minutes
#   bash benches/run.sh --only 1,3 --rounds 5    # chosen scenarios (1-5), more rounds
#
# It installs what is missing (docker-registry, nginx, wrk, ab, skopeo; Debian 12 packages, as root),
# builds regcache with `cargo build --release`, then runs benches/bench.py, which
#   - starts an upstream Distribution on 127.0.0.1 and pushes generated images to it (random,
#     incompressible content: one 512 MiB layer, one 4 KiB layer, 50 x 1 MiB layers, and a
#     linux/amd64 + linux/arm64 index), built as an OCI layout by benches/oci_images.py;
#   - starts Distribution in proxy mode over it, nginx over its blob files, and regcache with it
#     as the only upstream, each on its own loopback port and storage;
#   - runs the scenarios of issue 5: (1) warm 512 MiB blob throughput at 1, 8 and 32 clients with
#     CPU-seconds per GB served; (2) warm manifest GET/HEAD req/s and p50/p99 at 32 connections
#     (wrk with benches/manifest.lua), with keep-alive and with a connection per request; (3) cold
#     pull of the 512 MiB blob, first byte and total, against a direct download; (4) 16 clients on
#     the same cold blob, upstream GETs counted from the upstream's access log; (5) skopeo copy of
#     the 50-layer image, cold and warm, against the upstream (full runs only); (6) idle and peak
#     RSS of each server. Scenario 3 also measures the floor for any mirror that verifies a blob
#     before its last byte leaves (SHA-256 of the blob in memory). Run as root (in a network
#     namespace of its own, see below) with tc, scenarios 3 and 4 are repeated with the
#     upstream's traffic held to an internet link's bandwidth (--wan-rate, 1gbit by default,
#     'off' to skip; bandwidth only, no added latency).
# Each measurement is repeated (3 rounds; 1 with --quick) and the median reported; the ratios
# regcache/Distribution and regcache/nginx are taken round by round, then their median.
# It prints a table and writes target/bench/results.json and target/bench/results.txt; server
# logs and configs stay in target/bench/work/.
#
# Everything listens on 127.0.0.1 only. Every process started is stopped on exit, however the
# run ends. Needs ~3 GiB free under target/bench and is best run on an otherwise idle machine:
# the load generator shares the CPU with the servers (its CPU is not counted against them).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in docker-registry:docker-registry nginx:nginx wrk:wrk ab:apache2-utils skopeo:skopeo python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

cargo build --release --quiet
binary="$(pwd)/target/release/regcache"

# As root, the run gets a network namespace of its own: every server, client and the upstream
# link's shaping (scenarios 3 and 4 at --wan-rate) live on a private loopback that disappears
# with the run, however it ends. Elsewhere it runs on the machine's loopback, unshaped.
run=(python3 benches/bench.py --regcache "$binary" "$@")
if [[ $EUID -eq 0 ]] && command -v ip >/dev/null && unshare --net true 2>/dev/null; then
    REGCACHE_BENCH_NETNS=1 unshare --net sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}" &
else
    "${run[@]}" &
fi
bench_pid=$!
# bench.py stops what it started when it ends or is signalled; its children also die with it.
trap 'kill "$bench_pid" 2>/dev/null || true; wait "$bench_pid" 2>/dev/null || true' INT TERM HUP
trap 'kill "$bench_pid" 2>/dev/null || true' EXIT
wait "$bench_pid"
