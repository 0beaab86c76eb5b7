#!/usr/bin/env bash
# `make image`: build docker/Dockerfile in one flavour (gpu or cpu) with whichever container engine
# works here, tagged by the hash of its inputs so that an unchanged image is not built again.
#   docker/build-image.sh gpu|cpu
# Prints the image's name (gemma-lora-pipeline:<version>[-cpu]) last. Settings: ENGINE (podman or
# docker; default: the first whose `info` answers), PYTHON_IMAGE (the base; default: the Dockerfile's,
# or, where that cannot be had, the one docker/build-base.sh makes from a Debian mirror).
set -euo pipefail

flavour=${1:?usage: docker/build-image.sh gpu|cpu}
case "$flavour" in gpu|cpu) ;; *) echo "build-image.sh: flavour must be gpu or cpu, not '$flavour'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
name="gemma-lora-pipeline:${version}$([ "$flavour" = cpu ] && echo -cpu || true)"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}

# An engine that works, not only a binary on PATH (a docker CLI without a daemon is common).
engine=${ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in podman docker; do
    if command -v "$candidate" > /dev/null && timeout 60 "$candidate" info > /dev/null 2>&1; then engine=$candidate; break; fi
  done
fi
[ -n "$engine" ] || { echo "build-image.sh: neither podman nor docker works here (\`podman info\` / \`docker info\`); install podman (make test does: see docs/production.md)" >&2; exit 1; }

has_image() { "$engine" image inspect "$1" > /dev/null 2>&1; }

default_base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' docker/Dockerfile)
base=${PYTHON_IMAGE:-$default_base}
if ! has_image "$base" && ! timeout 120 "$engine" pull -q "$base" > /dev/null 2>&1; then
  if [ -n "${PYTHON_IMAGE:-}" ]; then echo "build-image.sh: base image $base not found" >&2; exit 1; fi
  base=localhost/gemma-python-base:3.11-bookworm
  echo "build-image.sh: $default_base cannot be pulled here; using $base (docker/build-base.sh)" >&2
  has_image "$base" || ENGINE=$engine docker/build-base.sh "$base"
fi

# The inputs: the Dockerfile, the locks, the project, the base image and the flavour.
inputs=$( { sha256sum docker/Dockerfile docker/Dockerfile.dockerignore requirements.lock docker/requirements-cuda.txt pyproject.toml;
            find tasks -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum;
            "$engine" image inspect --format '{{.Id}}' "$base"; echo "$flavour"; } | sha256sum | cut -c1-12)
hashed="gemma-lora-pipeline:${flavour}-${inputs}"
if has_image "$hashed"; then
  echo "build-image.sh: $hashed is up to date (its inputs have not changed)" >&2
else
  started=$(date +%s)
  args=(build -f docker/Dockerfile --build-arg "FLAVOUR=$flavour" --build-arg "PYTHON_IMAGE=$base" -t "$hashed")
  if [ "$engine" = podman ]; then
    # The build's downloads (PyPI) go through the host's network and trust its CA bundle.
    ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    args+=(--network host --ignorefile docker/Dockerfile.dockerignore)
    [ -f "$ca" ] && args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --env UV_NATIVE_TLS=1)
  fi
  "$engine" "${args[@]}" . >&2
  echo "build-image.sh: built $hashed in $(( $(date +%s) - started )) s" >&2
fi
"$engine" tag "$hashed" "$name"
# One image per flavour: older builds of this flavour go (each is several GB), and what no tag names
# any more (the build stage, an image the plain name has moved from).
for old in $("$engine" images --format '{{.Repository}}:{{.Tag}}' | grep -E "gemma-lora-pipeline:${flavour}-[0-9a-f]{12}$" | grep -v ":${flavour}-${inputs}$" || true); do
  "$engine" rmi -f "$old" > /dev/null 2>&1 || true
done
"$engine" image prune -f > /dev/null 2>&1 || true
echo "$name"
