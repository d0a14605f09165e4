#!/usr/bin/env bash
# Fetch the real Linux PV guest's parts from Debian bookworm with apt, check them, extract them.
#
#   scenarios/linux/fetch.sh          (as root, or a user apt can download for)
#
# Result, in the git-ignored scenarios/linux/build/:
#   debs/           the downloaded .deb files (kept so a second run downloads nothing)
#   kernel/         ./boot of linux-image-6.1.0-<abi>-amd64 (vmlinuz, config, System.map)
#   busybox/        busybox-static's file tree (bin/busybox)
#   manifest.json   package names, versions, sha256 of vmlinuz, busybox and System.map
# Nothing downloaded is ever committed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
build="$here/build"
debs="$build/debs"
mkdir -p "$debs"

die() { echo "fetch.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb sha256sum tar; do
    command -v "$tool" >/dev/null || die "needs $tool (a Debian system)"
done

candidate() {  # the version apt would install, empty when apt knows no such package
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}' | sed 's/(none)//'
}

# Package lists: only fetched when apt does not know the metapackage yet (fresh machine).
if [ -z "$(candidate linux-image-amd64)" ] || [ -z "$(candidate busybox-static)" ]; then
    apt-get update -q >&2
fi
[ -n "$(candidate linux-image-amd64)" ] || die "apt knows no linux-image-amd64: is bookworm main in sources.list?"

# The metapackage depends on exactly one concrete image, the newest 6.1 ABI in the archive.
kernel_pkg="$(apt-cache depends linux-image-amd64 \
    | awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2}' | sort -V | tail -1)"
[ -n "$kernel_pkg" ] || die "linux-image-amd64 does not depend on a linux-image-6.1.0-*-amd64 package"
kernel_ver="$(candidate "$kernel_pkg")"
busybox_pkg=busybox-static
busybox_ver="$(candidate "$busybox_pkg")"
[ -n "$kernel_ver" ] && [ -n "$busybox_ver" ] || die "apt has no candidate for $kernel_pkg or $busybox_pkg"
abi="${kernel_pkg#linux-image-}"

apt_sha256() {  # the SHA256 apt's signed Packages index gives for package $1 at version $2
    apt-cache show "$1=$2" | awk '/^SHA256:/ {print $2; exit}'
}
deb_path() {  # apt-get download's file name: epoch colon quoted as %3a
    echo "$debs/${1}_${2//:/%3a}_amd64.deb"
}

fetch_deb() {  # download (unless a verified copy is there), then check it against apt and dpkg-deb
    local pkg="$1" ver="$2" want deb tmp
    want="$(apt_sha256 "$pkg" "$ver")"
    [ -n "$want" ] || die "apt gives no SHA256 for $pkg $ver"
    deb="$(deb_path "$pkg" "$ver")"
    if [ ! -f "$deb" ] || [ "$(sha256sum "$deb" | cut -d' ' -f1)" != "$want" ]; then
        rm -f "$deb"
        echo "fetch.sh: downloading $pkg $ver" >&2
        # into a private folder first: an interrupted download leaves nothing in debs/
        tmp="$(mktemp -d "$build/download.XXXXXX")"
        trap "rm -rf '$tmp'" EXIT
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) \
            || die "apt-get download $pkg=$ver failed"
        [ -f "$tmp/$(basename "$deb")" ] || die "apt-get download gave no $(basename "$deb")"
        [ "$(sha256sum "$tmp/$(basename "$deb")" | cut -d' ' -f1)" = "$want" ] \
            || die "$pkg: sha256 differs from apt's index"
        mv "$tmp/$(basename "$deb")" "$deb"
        rm -rf "$tmp"
        trap - EXIT
    fi
    [ "$(dpkg-deb --field "$deb" Package)" = "$pkg" ] || die "$deb is not $pkg"
    [ "$(dpkg-deb --field "$deb" Version)" = "$ver" ] || die "$deb is not version $ver"
    echo "$deb"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
manifest="$build/manifest.json"
vmlinuz="$build/kernel/boot/vmlinuz-$abi"
sysmap="$build/kernel/boot/System.map-$abi"
busybox="$build/busybox/bin/busybox"

# Up to date: same packages, same versions, extracted files unchanged. Nothing to do.
if [ -f "$manifest" ] && [ -f "$vmlinuz" ] && [ -f "$busybox" ] \
   && grep -qF "\"version\": \"$kernel_ver\"" "$manifest" && grep -qF "\"package\": \"$kernel_pkg\"" "$manifest" \
   && grep -qF "\"version\": \"$busybox_ver\"" "$manifest" \
   && grep -qF "\"vmlinuz_sha256\": \"$(sha "$vmlinuz")\"" "$manifest" \
   && grep -qF "\"busybox_sha256\": \"$(sha "$busybox")\"" "$manifest"; then
    ln -sfn "kernel/boot/vmlinuz-$abi" "$build/vmlinuz"  # the name scenarios use
    echo "fetch.sh: up to date ($kernel_pkg $kernel_ver, $busybox_pkg $busybox_ver)" >&2
    exit 0
fi

kernel_deb="$(fetch_deb "$kernel_pkg" "$kernel_ver")"
busybox_deb="$(fetch_deb "$busybox_pkg" "$busybox_ver")"

# Extract. Of the kernel package only ./boot is needed (its modules are ~400 MB unpacked).
rm -f "$manifest"  # written again only once everything is in place
rm -rf "$build/kernel" "$build/busybox"
mkdir -p "$build/kernel" "$build/busybox"
dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$build/kernel" ./boot
dpkg-deb -x "$busybox_deb" "$build/busybox"
[ -f "$vmlinuz" ] || die "$kernel_pkg has no boot/vmlinuz-$abi"
[ -x "$busybox" ] || die "$busybox_pkg has no executable bin/busybox"
ln -sfn "kernel/boot/vmlinuz-$abi" "$build/vmlinuz"  # the name scenarios use

# Debian's System.map is a one-line placeholder (the real one is in the -dbg package).
if [ -f "$sysmap" ]; then
    sysmap_sha="\"$(sha "$sysmap")\""
    sysmap_rel="\"kernel/boot/System.map-$abi\""
    if [ "$(wc -l < "$sysmap")" -gt 1 ]; then sysmap_real=true; else sysmap_real=false; fi
else
    sysmap_sha=null; sysmap_rel=null; sysmap_real=false
fi

tmp="$(mktemp "$build/manifest.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cat > "$tmp" <<JSON
{
  "distribution": "debian bookworm",
  "kernel": {
    "package": "$kernel_pkg",
    "version": "$kernel_ver",
    "deb_sha256": "$(sha "$kernel_deb")",
    "vmlinuz": "kernel/boot/vmlinuz-$abi",
    "vmlinuz_sha256": "$(sha "$vmlinuz")",
    "system_map": $sysmap_rel,
    "system_map_sha256": $sysmap_sha,
    "system_map_has_symbols": $sysmap_real
  },
  "busybox": {
    "package": "$busybox_pkg",
    "version": "$busybox_ver",
    "deb_sha256": "$(sha "$busybox_deb")",
    "busybox": "busybox/bin/busybox",
    "busybox_sha256": "$(sha "$busybox")"
  }
}
JSON
mv "$tmp" "$manifest"
trap - EXIT
echo "fetch.sh: ready: $kernel_pkg $kernel_ver, $busybox_pkg $busybox_ver in $build" >&2
