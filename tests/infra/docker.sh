#!/usr/bin/env bash
# Make sure a Docker engine runs (this machine kind boots without one) and that
# the local Debian 12 image exists: no registry is reachable, so the image is
# built here with debootstrap from the machine's own Debian mirror.
set -euo pipefail

IMAGE="${THOR_BOOKWORM_IMAGE:-sipthor-bookworm:1}"
# What every container host needs before Ansible or apt can work in it.
BASE_PACKAGES="python3,python3-apt,ca-certificates,iproute2,procps"

start_engine() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    if ! command -v dockerd >/dev/null; then
        echo "dockerd is missing: install docker.io (make deps does)" >&2
        exit 1
    fi
    echo "starting dockerd"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    echo "dockerd did not come up; see /var/log/dockerd.log" >&2
    tail -20 /var/log/dockerd.log >&2 || true
    exit 1
}

mirror() {
    # The mirror this machine's apt uses, read at run time (never written down).
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    echo "${uri:?no Debian mirror configured for apt}"
}

build_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    local rootfs
    rootfs=$(mktemp -d /var/tmp/thor-rootfs.XXXXXX)
    echo "building $IMAGE with debootstrap (about a minute)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$(mirror)" >/var/tmp/thor-debootstrap.log 2>&1 || {
        tail -20 /var/tmp/thor-debootstrap.log >&2
        exit 1
    }
    # Daemons must not start while packages install inside containers.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
}

start_engine
build_image
echo "$IMAGE"
