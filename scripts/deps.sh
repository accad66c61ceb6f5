#!/usr/bin/env bash
# Checks (and as root, installs) the Debian packages Frakti's build and tests
# need. Usage: scripts/deps.sh [--check]
set -euo pipefail

packages=(
    # guest kernel build
    linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils
    # the lab and the QEMU baseline
    qemu-system-x86 busybox-static
    # agent.proto (tonic-build) and the agent's host-mode tests (busybox-static above, unshare)
    protobuf-compiler util-linux
    # ext4 image disks for the end-to-end tests (mke2fs -d)
    e2fsprogs
    # images: a real registry, image building/pushing, EROFS disks, the containerd baseline
    docker-registry skopeo umoci erofs-utils containerd runc openssl curl
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "${1:-}" = "--check" ] || [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing Debian packages: ${missing[*]}" >&2
    echo "deps: install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
