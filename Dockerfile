# connwatch container image: nothing but the static binary.
#
# Here, without Docker or a registry (what the project tests):
#   cargo xtask image        # buildah; also writes target/dist/connwatch-image-VERSION.oci.tar
# With Docker, from the same static binary:
#   cargo xtask dist && docker build -t connwatch .
# Run:
#   docker run --rm --privileged --pid=host --network=host \
#     -v /sys/kernel/btf:/sys/kernel/btf:ro connwatch serve --listen 127.0.0.1:9977
# See deploy/daemonset.yaml for the capabilities it needs instead of --privileged.
FROM scratch
COPY target/dist/connwatch /usr/local/bin/connwatch
EXPOSE 9977
ENTRYPOINT ["/usr/local/bin/connwatch"]
CMD ["serve", "--listen", "0.0.0.0:9977"]
