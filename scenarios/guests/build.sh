#!/usr/bin/env bash
# Build the PV guest kernels: <name>.s + lib/*.s -> <name>.elf (committed),
# and the HVM guest kernels, linked at guest-physical 1 MiB (hvm_kernel.ld)
# with the HVM-only library objects as well.
#
# Assembled with -g: gdb shows source lines (hvlab run --gdb).
# Needs GNU as and ld (binutils).  Objects go to build/ (git-ignored).  The
# output is reproducible: no timestamps, no build id, relative file names.
# Usage: scenarios/guests/build.sh            (from anywhere)
set -euo pipefail

GUESTS=(pv_hello pv_smp pv_faults pv_crash pv_spin pv_touch pv_ptchurn pv_hostile)
LIBS=(hypercall_page console check)
HVM_GUESTS=(hvm_lapic hvm_memtouch hvm_crash)
HVM_LIBS=(hvm_idt)
# Variants: NAME:SOURCE:ASSEMBLER FLAGS. hvm_lapic_slow is hvm_lapic built for the
# device schedule of scenarios/hvm-lapic-slow.toml (its guest reckons occurrences
# from the start and period it knows, as it knows the counts).
HVM_VARIANTS=("hvm_lapic_slow:hvm_lapic:--defsym SLOW_DEVICES=1")
# Linked only into the guests that manage page tables, so that adding them
# left the other kernels byte-identical.
MM_GUESTS=(pv_ptchurn pv_hostile)
MM_LIBS=(expect mm)
# Every PV guest: its Xen ELF notes and its entry (lib/xen_entry.s), Xen's PV ABI.
PV_LIBS=(xen_notes xen_entry)

AS=${AS:-as}
LD=${LD:-ld}
OBJCOPY=${OBJCOPY:-objcopy}
NM=${NM:-nm}
ASFLAGS=(--64 -g --fatal-warnings -I include)
LDFLAGS=(-m elf_x86_64 -T kernel.ld -static -nostdlib --build-id=none
         -z max-page-size=4096 -z noexecstack --fatal-warnings)
HVM_LDFLAGS=(-m elf_x86_64 -T hvm_kernel.ld -static -nostdlib --build-id=none
             -z max-page-size=4096 -z noexecstack --fatal-warnings)

die() { echo "build.sh: error: $*" >&2; exit 1; }

cd "$(dirname "$0")"
# Debug info (-g, for gdb) names this directory as ".", not where it was built.
ASFLAGS+=(--debug-prefix-map "$PWD=.")
for tool in "$AS" "$LD" "$OBJCOPY" "$NM"; do
    command -v "$tool" >/dev/null || die "'$tool' not found (install binutils)"
done
mkdir -p build

# assemble SOURCE OBJECT [FLAGS...]: as, then drop the local absolute symbols that the
# .equ constants of xen.inc leave in every object, so that the symbol table
# of the kernel (objdump -d, hvlab trace) shows only code and data labels.
assemble() {
    "$AS" "${ASFLAGS[@]}" "${@:3}" -o "$2" "$1" || die "assembling $1"
    "$NM" "$2" | awk '$2 == "a" { print $3 }' | sort -u > "$2.abs"
    if [[ -s "$2.abs" ]]; then
        "$OBJCOPY" --strip-symbols="$2.abs" "$2" || die "stripping constants from $2"
    fi
}

lib_objects=()
for lib in "${LIBS[@]}"; do
    assemble "lib/$lib.s" "build/lib_$lib.o"
    lib_objects+=("build/lib_$lib.o")
done

pv_objects=()
for lib in "${PV_LIBS[@]}"; do
    assemble "lib/$lib.s" "build/lib_$lib.o"
    pv_objects+=("build/lib_$lib.o")
done

mm_objects=()
for lib in "${MM_LIBS[@]}"; do
    assemble "lib/$lib.s" "build/lib_$lib.o"
    mm_objects+=("build/lib_$lib.o")
done

for guest in "${GUESTS[@]}"; do
    [[ -f "$guest.s" ]] || die "missing source $guest.s"
    assemble "$guest.s" "build/$guest.o"
    objects=("build/$guest.o" "${lib_objects[@]}" "${pv_objects[@]}")
    if [[ " ${MM_GUESTS[*]} " == *" $guest "* ]]; then
        objects+=("${mm_objects[@]}")
    fi
    "$LD" "${LDFLAGS[@]}" -o "$guest.elf" "${objects[@]}" \
        || die "linking $guest.elf"
    echo "built $guest.elf"
done

hvm_lib_objects=()
for lib in "${HVM_LIBS[@]}"; do
    assemble "lib/$lib.s" "build/lib_$lib.o"
    hvm_lib_objects+=("build/lib_$lib.o")
done

for guest in "${HVM_GUESTS[@]}"; do
    [[ -f "$guest.s" ]] || die "missing source $guest.s"
    assemble "$guest.s" "build/$guest.o"
    "$LD" "${HVM_LDFLAGS[@]}" -o "$guest.elf" "build/$guest.o" "${lib_objects[@]}" \
        "${hvm_lib_objects[@]}" || die "linking $guest.elf"
    echo "built $guest.elf"
done

for variant in "${HVM_VARIANTS[@]}"; do
    IFS=: read -r guest source flags <<< "$variant"
    read -r -a extra <<< "$flags"
    assemble "$source.s" "build/$guest.o" "${extra[@]}"
    "$LD" "${HVM_LDFLAGS[@]}" -o "$guest.elf" "build/$guest.o" "${lib_objects[@]}" \
        "${hvm_lib_objects[@]}" || die "linking $guest.elf"
    echo "built $guest.elf"
done
