# connwatch container image: multi-stage, small runtime.
#   docker build -t connwatch .
#   docker run --rm --privileged --pid=host --network=host \
#     -v /sys/kernel/btf:/sys/kernel/btf:ro connwatch serve --listen 127.0.0.1:9977
# See deploy/daemonset.yaml for the capabilities it needs instead of --privileged.

FROM rust:1.95-bookworm AS build
# The probe's toolchain (LLVM 22, nightly rust-src, bpf-linker) is installed by the
# project's own set-up, exactly as on a developer's machine.
WORKDIR /src
COPY . .
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && apt-get update \
 && cargo xtask setup \
 && cargo build --release --package connwatch \
 && target/release/connwatch generate --out /out \
 && cp target/release/connwatch /out/

FROM debian:bookworm-slim
# iproute2 only for `ss`-style debugging inside the pod; connwatch itself needs nothing.
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/connwatch /usr/local/bin/connwatch
COPY --from=build /out/man /usr/local/share/man/man1
COPY --from=build /out/completions/connwatch.bash /usr/share/bash-completion/completions/connwatch
EXPOSE 9977
ENTRYPOINT ["/usr/local/bin/connwatch"]
CMD ["serve", "--listen", "0.0.0.0:9977"]
