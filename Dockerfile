# regcache's container image: a static binary and the CA bundle, nothing else (no shell, no
# package manager), running as the non-root user 65532. CI builds the same image without a
# container engine with image/build-oci-layout.sh.
#
#   docker build -t regcache:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# glibc, statically linked: no musl target needed, and the binary runs on an empty image.
RUN RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target "$(uname -m)-unknown-linux-gnu" \
    && install -D -m 0755 "target/$(uname -m)-unknown-linux-gnu/release/regcache" /out/regcache \
    && mkdir -p /out/etc/ssl/certs /out/etc/regcache /out/var/lib/regcache \
    && cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ \
    && chown 65532:65532 /out/var/lib/regcache

FROM scratch
COPY --from=build /out/ /
USER 65532:65532
ENV REGCACHE_CONFIG=/etc/regcache/regcache.yaml
WORKDIR /var/lib/regcache
EXPOSE 5000
ENTRYPOINT ["/regcache"]
CMD ["serve"]
