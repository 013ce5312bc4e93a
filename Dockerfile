# syntax=docker/dockerfile:1.7
# mend: one image for every role (`mend sidecar`, `mend processor`, `mend dashboard`, `mend rules`).
#
#   docker build -t mend .
#   docker run --rm --read-only -v "$PWD/deploy:/etc/mend:ro" mend processor --config /etc/mend/processor.toml
#
# The final image is distroless (glibc, CA certificates, no shell), runs as the non-root user 65532
# and writes nothing outside /data (the working directory, where a relative `sqlite://mend.db`
# lands: mount a volume there) and /tmp, so it runs with a read-only root filesystem.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# No debug info and no symbols in the image's binary (the repository's release profile keeps some
# for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
COPY . .
# The registry and the target folder are build caches: rebuilds after a source change take
# minutes, not a cold build's quarter of an hour.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin mend \
    && install -D -m 0755 target/release/mend /out/usr/local/bin/mend \
    && install -d -m 0750 /out/data \
    && /out/usr/local/bin/mend --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/mend /usr/local/bin/mend
COPY --from=build --chown=65532:65532 /out/data /data
WORKDIR /data
USER 65532:65532
ENV MEND_LOG_FORMAT=json
# The dashboard (8080), a sidecar's (9464) and the processor's (9465) default ports.
EXPOSE 8080 9464 9465
ENTRYPOINT ["/usr/local/bin/mend"]
CMD ["--help"]
