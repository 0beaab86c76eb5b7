#!/usr/bin/env bash
# A Debian bookworm image with Python 3.11 (`python`, `pip`, venv), made from a Debian mirror with
# debootstrap, for networks where Docker Hub's python:3.11-slim-bookworm cannot be pulled (an
# air-gapped cluster builds it from its own mirror). docker/Dockerfile then builds on it:
#   docker/build-base.sh [NAME]           (root; needs debootstrap and podman or docker)
#   make image PYTHON_IMAGE=NAME          (make image calls this script itself when the default base is missing)
# Settings: DEBIAN_MIRROR (default: the machine's own apt mirror), ENGINE (podman or docker).
set -euo pipefail

name=${1:-localhost/gemma-python-base:3.11-bookworm}
engine=${ENGINE:-podman}
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}

command -v debootstrap > /dev/null || { echo "build-base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

echo "build-base.sh: debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# What the python image has and Debian's packages do not: `python` and `pip` on PATH, and pip allowed
# to install (the image's own venv in docker/Dockerfile is where packages go).
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -c . | "$engine" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python"]' - "$name" > /dev/null
echo "build-base.sh: $name ($("$engine" run --rm "$name" python --version 2>&1))" >&2
