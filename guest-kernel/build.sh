#!/usr/bin/env bash
# Builds the Frakti guest kernel (ELF vmlinux with a PVH entry) from Debian's
# linux-source-6.12: tinyconfig + config.fragment + olddefconfig.
#
# The result is cached under $FRAKTI_CACHE/guest-kernel/<hash>/ where the hash
# covers the fragment, the source package version and this script, so a second
# run costs nothing. Progress goes to stderr; the path of vmlinux goes to stdout.
#
# Usage: guest-kernel/build.sh [--jobs N]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/config.fragment"
source_pkg=linux-source-6.12
tarball=/usr/src/linux-source-6.12.tar.xz
cache="${FRAKTI_CACHE:-$HOME/.cache/frakti}/guest-kernel"
jobs=$(nproc)

while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf '[guest-kernel %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }

check_prerequisites() {
    local missing=()
    [ -f "$tarball" ] || missing+=("$source_pkg")
    local tool pkg
    for tool in make:make gcc:gcc flex:flex bison:bison bc:bc xz:xz-utils perl:perl; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    for pkg in /usr/include/gelf.h:libelf-dev /usr/include/openssl/ssl.h:libssl-dev; do
        [ -f "${pkg%%:*}" ] || missing+=("${pkg#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing Debian packages: ${missing[*]}
  install them with: apt-get install --no-install-recommends ${missing[*]}"
    fi
}

# Every option the fragment sets must survive olddefconfig unchanged.
check_fragment_kept() {
    local config=$1 dropped=() line name
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=n)
                name=${line%%=*}
                grep -q "^$name=" "$config" && dropped+=("$line (got $(grep "^$name=" "$config"))") ;;
            CONFIG_*=*)
                grep -qx "$line" "$config" || dropped+=("$line (got $(grep "^${line%%=*}[= ]" "$config" || echo 'not set'))") ;;
        esac
    done < "$fragment"
    if [ ${#dropped[@]} -gt 0 ]; then
        printf '  %s\n' "${dropped[@]}" >&2
        die "olddefconfig dropped ${#dropped[@]} option(s) of $fragment (unmet dependencies?)"
    fi
}

# The work tree is removed on exit, so the log is kept beside the cache.
fail_with_log() {
    local what=$1 log=$2 kept="$cache/last-failed-build.log"
    cp "$log" "$kept"
    echo "---- last 40 lines of $kept ----" >&2
    tail -n 40 "$kept" >&2
    echo "----" >&2
    die "$what failed; full log: $kept"
}

check_prerequisites
source_version=$(dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null || stat -c %Y "$tarball")
key=$( { cat "$fragment" "$0"; echo "$source_version"; } | sha256sum | cut -c1-16)
out="$cache/$key"

if [ -f "$out/vmlinux" ]; then
    say "cached: $out/vmlinux ($source_pkg $source_version)"
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$work/build.log"
say "building $source_pkg $source_version, fragment hash $key (about 4 minutes on 2 cores)"

say "unpacking $tarball"
tar -xaf "$tarball" -C "$work" --strip-components=1 || die "cannot unpack $tarball"

say "configuring: tinyconfig + fragment + olddefconfig"
(
    cd "$work"
    make -s tinyconfig
    ./scripts/kconfig/merge_config.sh -m .config "$fragment"
    make -s olddefconfig
) >"$log" 2>&1 || fail_with_log "kernel configuration" "$log"
check_fragment_kept "$work/.config"

say "compiling vmlinux with $jobs jobs (log: $log)"
make -C "$work" -j"$jobs" vmlinux >>"$log" 2>&1 &
make_pid=$!
trap 'kill $make_pid 2>/dev/null || true; rm -rf "$work"' EXIT
while kill -0 $make_pid 2>/dev/null; do
    sleep 15
    kill -0 $make_pid 2>/dev/null && say "compiling… $(grep -c '^  CC' "$log" || true) files compiled"
done
wait $make_pid || fail_with_log "kernel build" "$log"

mkdir -p "$out.tmp"
cp "$work/vmlinux" "$out.tmp/vmlinux"
cp "$work/.config" "$out.tmp/config"
echo "$source_pkg $source_version" > "$out.tmp/source-version"
rm -rf "$out" && mv "$out.tmp" "$out"
say "done: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
echo "$out/vmlinux"
