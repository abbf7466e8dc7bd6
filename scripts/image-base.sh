#!/usr/bin/env bash
# A local base image for the Containerfile when no registry can be reached:
# a Debian root filesystem with Python (debootstrap), packed once into a cached
# tarball and loaded with `podman import`. Prints the image name on stdout.
#
#   IMAGE_CACHE_DIR   where the tarball is kept (default /var/cache/aifa-broker-image)
#   BASE_SUITE        Debian suite (default bookworm: Python 3.11, the project's minimum)
#   BASE_MIRROR       Debian mirror (default http://deb.debian.org/debian)
#
# Cold: debootstrap downloads and unpacks ~120 MB of packages (about 1–3 min on a
# fast mirror); warm: the tarball exists and only `podman import` runs (a few
# seconds), or nothing when the image is already loaded.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${BASE_SUITE:-bookworm}
CACHE=${IMAGE_CACHE_DIR:-/var/cache/aifa-broker-image}
IMAGE=localhost/aifa-base-python:$SUITE
TARBALL=$CACHE/debian-$SUITE-python.tar
PODMAN=${PODMAN:-podman --runtime runc --cgroup-manager=cgroupfs}
say() { echo "image-base: $*" >&2; }

if $PODMAN image exists "$IMAGE"; then
    say "$IMAGE already loaded"
    echo "$IMAGE"
    exit 0
fi
if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || { say "debootstrap missing (scripts/setup-test-deps.sh installs it)"; exit 1; }
    mirror=${BASE_MIRROR:-http://deb.debian.org/debian}
    mkdir -p "$CACHE"
    root=$(mktemp -d "$CACHE/root.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    start=$(date +%s)
    say "debootstrap $SUITE from $mirror (cold build: once per machine)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$root" "$mirror" >&2
    # trust what this host trusts (a site's TLS-inspecting proxy or package mirror CA):
    # pip in the build stage uses this bundle (PIP_CERT in the Containerfile)
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    # apt lists and caches are not needed in a base image
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # the contents of the pseudo/volatile file systems stay out, their (empty) mount points in
    tar -C "$root" --numeric-owner --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
        --exclude='./run/*' --exclude='./tmp/*' -cf "$TARBALL.part" .
    mv "$TARBALL.part" "$TARBALL"
    say "rootfs tarball $TARBALL made in $(( $(date +%s) - start )) s"
fi
$PODMAN import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >&2
say "$IMAGE imported from $TARBALL"
echo "$IMAGE"
