#!/bin/sh
# The node side of a CSI driver for loop-image volumes, on Frakti: what each
# CSI node call runs. A real driver (RBD, a cloud disk, iSCSI) differs only in
# how `stage` makes the block device; publishing is the same: the device is
# registered with Frakti instead of being mounted on the host, and the pod's
# VM gets it as a disk that the guest mounts.
#
#   csi-loop-volume.sh stage IMAGE_FILE SIZE_MIB      NodeStageVolume: prints the device
#   csi-loop-volume.sh publish DEVICE TARGET_PATH [ro] NodePublishVolume
#   csi-loop-volume.sh stats TARGET_PATH               NodeGetVolumeStats (JSON, from the guest)
#   csi-loop-volume.sh unpublish TARGET_PATH           NodeUnpublishVolume
#   csi-loop-volume.sh unstage DEVICE                  NodeUnstageVolume
#
# Environment: FRAKTI (the frakti binary, default `frakti`), FRAKTI_ROOT (the
# daemon's --root, default /var/lib/frakti), FRAKTI_ENDPOINT (its socket, for
# stats), MKE2FS (default mke2fs). The e2e suite runs this script
# (tests/e2e/cri/devices.rs), so it stays true.
set -eu

frakti="${FRAKTI:-frakti}"
root="${FRAKTI_ROOT:-/var/lib/frakti}"

usage() {
    echo "usage: $0 stage IMAGE_FILE SIZE_MIB | publish DEVICE TARGET_PATH [ro] |" \
         "stats TARGET_PATH | unpublish TARGET_PATH | unstage DEVICE" >&2
    exit 2
}

[ $# -ge 2 ] || usage
command="$1"
shift
case "$command" in
stage)
    [ $# -eq 2 ] || usage
    image="$1"
    if [ ! -e "$image" ]; then
        # A new volume: a sparse file with an empty ext4 on it.
        dd if=/dev/zero of="$image" bs=1048576 count=0 seek="$2" 2>/dev/null
        fresh=1
    fi
    # util-linux prints the device it picked; busybox's losetup cannot.
    if ! device=$(losetup -f --show "$image" 2>/dev/null); then
        device=$(losetup -f)
        losetup "$device" "$image"
    fi
    if [ "${fresh:-0}" = 1 ]; then
        "${MKE2FS:-mke2fs}" -q -t ext4 "$device"
    fi
    echo "$device"
    ;;
publish)
    [ $# -ge 2 ] && [ $# -le 3 ] || usage
    readonly_flag=""
    if [ "${3:-}" = ro ]; then
        readonly_flag="--readonly"
    fi
    # kubelet made the target path's parent; the path is what its pods mount.
    mkdir -p "$2"
    "$frakti" volume --root "$root" add --path "$2" --device "$1" --fstype ext4 \
        --options noatime $readonly_flag
    ;;
stats)
    [ $# -eq 1 ] || usage
    "$frakti" volume --root "$root" stats --path "$1" --format json
    ;;
unpublish)
    [ $# -eq 1 ] || usage
    "$frakti" volume --root "$root" remove --path "$1"
    ;;
unstage)
    [ $# -eq 1 ] || usage
    losetup -d "$1"
    ;;
*)
    usage
    ;;
esac
