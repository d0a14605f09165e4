#!/usr/bin/env bash
# Make the research images of real Linux page tables: Debian's kernel (linux-pv.toml) saved by
# `hvlab save` at three points of its run. Run scenarios/linux/fetch.sh first.
#
#   scenarios/linux/make-images.sh [-o DIR] [NAME...]     (default: every image)
#
# Writes DIR/NAME.img.zst (default DIR: the git-ignored scenarios/linux/build/images/) and
# prints "sha256  file" for each. The images hold the kernel's and busybox's bytes, so they
# are never committed; scenarios/images/README.md lists each one's recipe and sha256, and the
# same recipe gives the same bytes every time (virtual time only, zstd level 3, one thread,
# no timestamps). About a minute and a half of CPU per image (a boot to ~3.1 s virtual).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/build/images"

die() { echo "make-images.sh: $*" >&2; exit 2; }

# name -> virtual time of the save (see scenarios/images/README.md for what each one holds)
declare -A AT=(
    [linux-boot-end-256M]=3016ms      # just after "Run /init as init process"
    [linux-mid-workload-256M]=3100ms  # between the workload's first and second round
    [linux-18-procs-256M]=3140ms      # 18 processes alive (39 pinned L4s), the workload's peak
)
ORDER=(linux-boot-end-256M linux-mid-workload-256M linux-18-procs-256M)

if [ "${1:-}" = "-o" ]; then
    [ $# -ge 2 ] || die "-o needs a folder"
    out="$2"
    shift 2
fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
    [ -n "${AT[$name]:-}" ] || die "no image '$name' (images: ${ORDER[*]})"
done
[ -f "$here/build/manifest.json" ] || die "no fetched kernel: run scenarios/linux/fetch.sh first"
mkdir -p "$out"

python="${PYTHON:-python3}"
for name in "${names[@]}"; do
    image="$out/$name.img.zst"
    # written under a temporary name first: an interrupted run leaves no partial image
    tmp="$out/.$name.partial.img.zst"
    trap 'rm -f "$tmp"' EXIT
    (cd "$repo" && PYTHONPATH="$repo" "$python" -m hypervisor.cli save scenarios/linux-pv.toml \
        --domain linux --at "${AT[$name]}" -o "$tmp" >&2) || die "hvlab save of $name failed"
    mv "$tmp" "$image"
    trap - EXIT
    (cd "$out" && sha256sum "$name.img.zst")
done
