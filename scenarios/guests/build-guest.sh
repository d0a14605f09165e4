#!/usr/bin/env bash
# Build one PV guest kernel from any assembly source, with hvlab's guest
# library (hypercall page, console, checks, mm, Xen notes and entry) and debug info (-g, for gdb):
#
#     scenarios/guests/build-guest.sh SOURCE.s [OUTPUT.elf]
#
# OUTPUT defaults to SOURCE with .elf.  The source may `.include "xen.inc"`
# (the PV ABI's constants and macros: HYPERCALL, PRINT, STR, CHECK_DEC ...).
# Needs GNU as and ld (binutils); objects go to a temporary folder that is
# removed on every path.  Exit status 2: bad arguments or a missing tool;
# 1: the source did not assemble or link (the assembler's messages above).
set -euo pipefail

usage() { echo "usage: $0 SOURCE.s [OUTPUT.elf]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
source=$1
[[ -f "$source" ]] || { echo "build-guest.sh: no such source file: $source" >&2; exit 2; }
output=${2:-${source%.s}.elf}

AS=${AS:-as}
LD=${LD:-ld}
for tool in "$AS" "$LD"; do
    command -v "$tool" >/dev/null || {
        echo "build-guest.sh: '$tool' not found: install GNU binutils (as, ld)" >&2; exit 2; }
done

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ASFLAGS=(--64 -g --fatal-warnings -I "$here/include")
LDFLAGS=(-m elf_x86_64 -T "$here/kernel.ld" -static -nostdlib --build-id=none
         -z max-page-size=4096 -z noexecstack --fatal-warnings)

objects=()
"$AS" "${ASFLAGS[@]}" -o "$work/guest.o" "$source" || exit 1
objects+=("$work/guest.o")
for lib in hypercall_page console check expect mm xen_notes xen_entry; do
    "$AS" "${ASFLAGS[@]}" -o "$work/lib_$lib.o" "$here/lib/$lib.s" || exit 1
    objects+=("$work/lib_$lib.o")
done
"$LD" "${LDFLAGS[@]}" -o "$output" "${objects[@]}" || exit 1
echo "built $output"
