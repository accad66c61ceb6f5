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
    # pod networks: the CNI plugins (bridge, host-local, ptp, loopback, portmap) the network
    # tests run in the lab, ip/tc/nsenter their checks use, and
    # iptables (legacy) for the portmap plugin
    containernetworking-plugins iproute2 iptables
    # the streaming tests' WebSocket client (the kubernetes Python client, in a venv)
    python3 python3-venv
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

# kubectl 1.20 (Debian's kubernetes-client), the streaming tests' independent
# SPDY client. Unpacked beside the system rather than installed: a `kubectl`
# package from elsewhere may already own /usr/bin/kubectl.
kubectl_dir=/usr/local/lib/frakti-test/kubectl-1.20
kubectl_bin=$kubectl_dir/usr/bin/kubectl
# The kubernetes Python client (PyPI), the streaming tests' independent
# WebSocket client, in a venv of Debian's Python.
pyk8s_dir=/usr/local/lib/frakti-test/pyk8s
pyk8s_version=37.0.2
pyk8s_ready=$pyk8s_dir/lib/python3.11/site-packages/kubernetes-$pyk8s_version.dist-info

if [ "${1:-}" = "--check" ] || [ "$(id -u)" -ne 0 ]; then
    status=0
    if [ ${#missing[@]} -ne 0 ]; then
        echo "deps: missing Debian packages: ${missing[*]}" >&2
        echo "deps: install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
        status=1
    fi
    if [ ! -x "$kubectl_bin" ]; then
        echo "deps: missing $kubectl_bin (Debian's kubernetes-client, unpacked)" >&2
        echo "deps: run scripts/deps.sh as root to unpack it" >&2
        status=1
    fi
    if [ ! -d "$pyk8s_ready" ]; then
        echo "deps: missing the kubernetes Python client $pyk8s_version in $pyk8s_dir" >&2
        echo "deps: run scripts/deps.sh as root to install it" >&2
        status=1
    fi
    exit $status
fi

export DEBIAN_FRONTEND=noninteractive
updated=
if [ ${#missing[@]} -ne 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -qq
    updated=1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$kubectl_bin" ]; then
    echo "deps: unpacking kubernetes-client into $kubectl_dir" >&2
    [ -n "$updated" ] || apt-get update -qq
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apt-get download writes into the current directory as the _apt user
    # (if it exists): let it.
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -qq kubernetes-client)
    unpacked=$tmp/unpacked
    mkdir "$unpacked"
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$unpacked"
    [ -x "$unpacked/usr/bin/kubectl" ] || {
        echo "deps: the kubernetes-client package holds no usr/bin/kubectl" >&2
        exit 1
    }
    mkdir -p "$(dirname "$kubectl_dir")"
    rm -rf "$kubectl_dir"
    mv "$unpacked" "$kubectl_dir"
    "$kubectl_bin" version --client >&2
fi

if [ ! -d "$pyk8s_ready" ]; then
    echo "deps: installing the kubernetes Python client $pyk8s_version into $pyk8s_dir" >&2
    rm -rf "$pyk8s_dir"
    python3 -m venv "$pyk8s_dir"
    "$pyk8s_dir/bin/pip" install -q --disable-pip-version-check "kubernetes==$pyk8s_version"
fi
