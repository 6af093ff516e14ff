#!/usr/bin/env bash
# Build a base image from Debian bookworm packages with mmdebstrap and import it into the local Docker engine.
#
#   docker/local/base.sh python ddpm-local/python:bookworm   # python3.11 + venv: stands in for python:3.x-slim
#   docker/local/base.sh redis  ddpm-local/redis:bookworm    # redis-server 7.0: stands in for redis:7.4-alpine
#
# For machines that reach Debian's and PyPI's package servers but no container registry (make image-test,
# make compose-test). Skips the work when the tag already exists (FORCE=1 rebuilds). The host's CA bundle is
# copied in, and /etc/pip.conf points pip at it, so pip inside a build trusts whatever the host trusts (e.g. a
# TLS-inspecting proxy); these images are for local proofs, never for a registry.
set -euo pipefail
kind=${1:?usage: base.sh python|redis TAG}
tag=${2:?usage: base.sh python|redis TAG}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if [[ -z ${FORCE:-} ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base.sh: $tag exists (FORCE=1 rebuilds)"
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "base.sh: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }

hooks=(--customize-hook="upload $ca_bundle /etc/ssl/certs/ca-certificates.crt")
case $kind in
  python)
    packages=python3,python3-venv,python-is-python3,ca-certificates
    hooks+=(--customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"')
    changes=(--change 'CMD ["python3"]')
    ;;
  redis)
    packages=redis-server,redis-tools,ca-certificates
    # The official redis image is built with protected mode off (it listens to other containers without a
    # password); Debian's redis-server is not, so the entrypoint adds --protected-mode no for redis-server.
    hooks+=(--customize-hook='chroot "$1" install -d -o redis -g redis /data'
            --customize-hook='printf "#!/bin/sh\nif [ \"\$1\" = redis-server ]; then exec \"\$@\" --protected-mode no; fi\nexec \"\$@\"\n" > "$1/usr/local/bin/redis-entrypoint" && chmod 0755 "$1/usr/local/bin/redis-entrypoint"')
    changes=(--change 'USER redis' --change 'WORKDIR /data' --change 'ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]'
             --change 'CMD ["redis-server"]' --change 'EXPOSE 6379')
    ;;
  *) echo "base.sh: unknown kind $kind (python|redis)" >&2; exit 2 ;;
esac

tarball=$(mktemp --suffix=.tar)
trap 'rm -f "$tarball"' EXIT
mmdebstrap --quiet --variant=minbase --include="$packages" "${hooks[@]}" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$suite" "$tarball" "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main"
docker import "${changes[@]}" "$tarball" "$tag" >/dev/null
echo "base.sh: $tag imported ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec) from $suite)"
