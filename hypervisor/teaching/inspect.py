"""`hvlab inspect`: a domain's state at a moment, as the hypervisor sees it.

The machine comes from a scenario run to virtual time `--at`, or from a stored
image restored into a machine made to fit it (then run for `--at`, 0 by
default). Each view is data first (a dict, printed with --json) and a rich
table second:

- walk VA: the page walk level by level: each entry, its flags, the frame it
  points to and that frame's page type, type count, pinned and validated bits
  (HVM: the guest tables live in guest-physical memory; each frame is shown
  with its EPT translation and p2m type), then the final frame.
- frames: the domain's frames summarised by type, or one row per frame of a
  pseudo-physical range.
- ept GPA (HVM): the EPT translation of a guest-physical address.
- lapic (HVM): IRR/ISR/TMR, TPR/PPR and the timer of every vCPU.
- evtchn (PV): bound ports, pending and masked bits, upcall flags.
- vcpu: every vCPU's registers and page-table roots.

Reading never changes the guest: walks set no Accessed or Dirty bits.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from emulator.addr import GPA, PAGE_SIZE
from emulator.engine import PhysicalCpu
from emulator.paging import ADDR_MASK, NX, PSE, P, canonical
from hypervisor.hvm.ept import INVALID_MFN, P2mType
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import PageType

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

PTE_FLAGS = (("P", 0), ("RW", 1), ("US", 2), ("PWT", 3), ("PCD", 4), ("A", 5), ("D", 6),
             ("PS", 7), ("G", 8), ("NX", 63))
IMAGE_HEADROOM = 16 << 20  # host memory beyond the image's own pages (tables, hypervisor)


# ------------------------------------------------------------ the machine
def open_machine(source: str, at_ns: int) -> Hypervisor:
    """A scenario run to `at_ns`, or an image restored and run for `at_ns`."""
    path = Path(source)
    if path.suffix == ".toml":
        from hypervisor.runner import boot_scenario
        from hypervisor.scenario import load_scenario

        hv = boot_scenario(load_scenario(path))
    else:
        hv = _machine_for_image(path)
    if at_ns:
        hv.run(at_ns)
    return hv


def _machine_for_image(path: Path) -> Hypervisor:
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images import image_info
    from hypervisor.images.domains import restore_domain

    if not path.is_file():
        raise HvlabError(f"{path}: no such scenario or image")
    info = image_info(path, out=io.StringIO())
    memory = (int(info["nr_pages"]) * PAGE_SIZE * 2 + IMAGE_HEADROOM) // PAGE_SIZE * PAGE_SIZE
    pcpus = max(1, int(info["vcpus"]["count"]))
    hv = Hypervisor(MachineConfig(pcpus, memory))
    restore_domain(hv, path)
    return hv


def pick_domain(hv: Hypervisor, name: str | None) -> Domain:
    if name is None and len(hv.domains) == 1:
        return hv.domains[0]
    dom = next((d for d in hv.domains if d.name == name), None)
    if dom is None:
        names = ", ".join(d.name for d in hv.domains)
        what = f"no domain '{name}'" if name else "several domains, pick one with --domain"
        raise HvlabError(f"{what} (domains: {names})")
    return dom


def register_value(hv: Hypervisor, v: Vcpu, name: str) -> int:
    """A vCPU's register from the engine it is loaded on, or from its saved context."""
    if hv.loaded[v.pcpu] is v:
        return hv.pcpus[v.pcpu].reg(name)
    return PhysicalCpu.context_reg(v.context, name)


# ---------------------------------------------------------------- views
def frame_state(hv: Hypervisor, mfn: int) -> dict[str, Any]:
    ft = hv.frame_table
    if not 0 <= mfn < hv.memory.nr_frames:
        return {"mfn": mfn, "outside_memory": True}
    pfn = int(hv.m2p[mfn])
    return {"mfn": mfn, "pfn": None if pfn == 0xFFFF_FFFF_FFFF_FFFF else pfn,
            "owner": ft.owner_of(mfn), "type": ft.page_type(mfn).name,
            "type_count": ft.type_count(mfn), "pinned": ft.is_pinned(mfn),
            "validated": ft.is_validated(mfn), "general_count": ft.general_count(mfn)}


def _ept_state(dom: Domain, gpa: int) -> dict[str, Any]:
    assert dom.hvm is not None
    w = dom.hvm.physmap.ept.walk(GPA(gpa))
    if w is None:
        return {"gpa": gpa, "mapped": False}
    return {"gpa": gpa, "mapped": True,
            "mfn": None if w.mfn == INVALID_MFN else int(w.mfn),
            "p2m_type": P2mType(w.p2m_type).name, "level": w.level,
            "page": {1: "4K", 2: "2M", 3: "1G"}.get(w.level, "?"),
            "perms": "".join(c if w.perms & bit else "-" for c, bit in
                             (("r", 1), ("w", 2), ("x", 4)))}


def flags_of(entry: int) -> list[str]:
    return [name for name, bit in PTE_FLAGS if entry >> bit & 1]


def walk_view(hv: Hypervisor, dom: Domain, va: int, vcpu: int = 0) -> dict[str, Any]:
    v = dom.vcpus[vcpu]
    hvm = dom.hvm is not None
    out: dict[str, Any] = {"domain": dom.name, "vcpu": vcpu, "va": va, "levels": []}
    if not canonical(va):
        out["fault"] = "not a canonical address"
        return out
    if hvm:
        table = register_value(hv, v, "cr3") & ADDR_MASK  # guest-physical
        out["root"] = {"cr3": table, "ept": _ept_state(dom, table)}
    else:
        table = v.roots.kernel_ma
        out["root"] = frame_state(hv, table >> 12)
    u64 = hv.memory.u64
    for level in (4, 3, 2, 1):
        index = (va >> (12 + 9 * (level - 1))) & 0x1FF
        if hvm:
            t = dom.hvm.physmap.gpa_to_ma(table)  # type: ignore[union-attr]
            if t is None:
                out["fault"] = f"level {level} table at GPA {table:#x} is not in EPT"
                return out
            table_ma = t
        else:
            table_ma = table
        entry = int(u64[(table_ma + 8 * index) >> 3])
        target = entry & ADDR_MASK
        row: dict[str, Any] = {"level": level, "index": index, "entry_address": table + 8 * index,
                               "entry": entry, "flags": flags_of(entry)}
        if entry & P:
            row["target"] = (_ept_state(dom, target) if hvm else frame_state(hv, target >> 12))
        out["levels"].append(row)
        if not entry & P:
            out["fault"] = f"not present at level {level}"
            return out
        if level in (3, 2) and entry & PSE:
            out["fault"] = f"large page at level {level} (not supported by hvlab's walker)"
            return out
        table = target
    gpa_or_ma = table + (va & 0xFFF)
    out["final"] = {"address": gpa_or_ma, "nx": bool(out["levels"][-1]["entry"] & NX),
                    **(_ept_state(dom, gpa_or_ma) if hvm else frame_state(hv, table >> 12))}
    return out


def frames_view(hv: Hypervisor, dom: Domain, first: int | None = None,
                last: int | None = None) -> dict[str, Any]:
    if dom.hvm is not None:
        physmap = dom.hvm.physmap
        if first is None:
            found = physmap.ept.lookup_many(np.arange(physmap.nr_pages, dtype=np.uint64))
            codes, counts = np.unique(found.p2m_type, return_counts=True)
            kinds = {P2mType(int(c)).name: int(n) for c, n in zip(codes, counts, strict=True)}
            return {"domain": dom.name, "kind": "hvm", "by_type": kinds,
                    "frames": physmap.nr_pages}
        rows = [_ept_state(dom, gfn * PAGE_SIZE) | {"gfn": gfn}
                for gfn in range(first, min(last or first, physmap.nr_pages - 1) + 1)]
        return {"domain": dom.name, "kind": "hvm", "range": [first, last], "rows": rows}
    if first is None:
        ft = hv.frame_table
        owned = ft.frames_of(dom.domid)
        types = ft.types(owned)
        pinned = ft.pinned(owned)
        validated = ft.validated(owned)
        by_type: dict[str, dict[str, int]] = {}
        for code in sorted(set(int(t) for t in types)):
            sel = types == code
            by_type[PageType(code).name] = {"frames": int(sel.sum()),
                                            "pinned": int(pinned[sel].sum()),
                                            "validated": int(validated[sel].sum())}
        return {"domain": dom.name, "kind": "pv", "frames": int(owned.size), "by_type": by_type}
    last = min(last if last is not None else first, dom.nr_pages - 1)
    rows = [frame_state(hv, int(dom.p2m[pfn])) | {"pfn": pfn} for pfn in range(first, last + 1)]
    return {"domain": dom.name, "kind": "pv", "range": [first, last], "rows": rows}


def ept_view(hv: Hypervisor, dom: Domain, gpa: int) -> dict[str, Any]:
    if dom.hvm is None:
        raise HvlabError(f"domain {dom.name} is PV: it has no EPT (try `walk`)")
    return {"domain": dom.name, **_ept_state(dom, gpa)}


def lapic_view(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    from hypervisor.hvm.vlapic import REG_LVT_TIMER, REG_TIMER_INITIAL

    if dom.hvm is None:
        raise HvlabError(f"domain {dom.name} is PV: it has no local APIC (try `evtchn`)")
    rows = []
    for v in dom.vcpus:
        assert v.hvm is not None
        lapic = v.hvm.lapic
        lvt = lapic.mmio_read(REG_LVT_TIMER, 4)
        rows.append({
            "vcpu": v.vcpu_id, "apic_id": lapic.apic_id, "enabled": lapic.enabled,
            "tpr": lapic.tpr, "ppr": lapic.ppr, "irr": lapic.irr_vectors(),
            "isr": lapic.isr_vectors(), "tmr": lapic.tmr_vectors(),
            "timer": {"vector": lvt & 0xFF, "masked": bool(lvt >> 16 & 1),
                      "mode": "periodic" if lapic.timer_periodic else "one-shot",
                      "initial_count": lapic.mmio_read(REG_TIMER_INITIAL, 4),
                      "divide": lapic.divide, "running": lapic.timer_running,
                      "next_deadline_ns": lapic.next_deadline_ns()}})
    return {"domain": dom.name, "vcpus": rows}


def evtchn_view(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    from hypervisor.core.evtchn import FREE, SharedInfoBits

    if dom.evtchn is None:
        raise HvlabError(f"domain {dom.name} has no event channels (HVM: try `lapic`)")
    ev = dom.evtchn
    bits: SharedInfoBits = ev.bits
    ports = [{"port": port, "state": p.state, "vcpu": p.notify_vcpu,
              "remote_dom": p.remote_dom if p.remote_dom >= 0 else None,
              "remote_port": p.remote_port, "virq": p.virq if p.virq >= 0 else None,
              "pending": bits.test(bits.PENDING, port), "masked": bits.test(bits.MASK, port)}
             for port, p in sorted(ev.state.ports.items()) if p.state != FREE]
    vcpus = [{"vcpu": i, "upcall_pending": bits.upcall_pending(i),
              "upcall_mask": bits.upcall_mask(i)} for i in range(ev.nr_vcpus)]
    return {"domain": dom.name, "ports": ports, "vcpus": vcpus,
            "sent": ev.state.sent, "raised": ev.state.raised}


VCPU_REGISTERS = ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                  "cr0", "cr2", "cr3", "cr4", "efer", "cs", "ss", "fs_base", "gs_base")


def vcpu_view(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    rows = []
    for v in dom.vcpus:
        row: dict[str, Any] = {"vcpu": v.vcpu_id, "state": v.runstate, "pcpu": v.pcpu,
                               "instructions": v.instructions}
        if v.context is not None:
            row["registers"] = {name: register_value(hv, v, name) for name in VCPU_REGISTERS}
        if dom.hvm is None:  # PV: the tables the hypervisor walks, not the CR3 register
            row["kernel_cr3"] = v.roots.kernel_ma
            row["user_cr3"] = v.roots.user_ma
        rows.append(row)
    return {"domain": dom.name, "vcpus": rows}


# ----------------------------------------------------------------- text
def _hex(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _frame_cell(f: dict[str, Any] | None) -> str:
    if not f:
        return ""
    if "p2m_type" in f or "mapped" in f:  # an EPT translation
        if not f.get("mapped"):
            return f"GPA {f['gpa']:#x}: not in EPT"
        mfn = "-" if f["mfn"] is None else f"{f['mfn']:#x}"
        return f"gfn {f['gpa'] >> 12:#x} -> mfn {mfn} {f['p2m_type']} {f['perms']}"
    if f.get("outside_memory"):
        return f"mfn {f['mfn']:#x}: outside host memory"
    flags = " ".join(x for x, on in (("pinned", f["pinned"]), ("validated", f["validated"]))
                     if on)
    return (f"mfn {f['mfn']:#x} {f['type']} count {f['type_count']}"
            f"{' ' + flags if flags else ''} (owner {f['owner']})")


def print_view(view: str, data: dict[str, Any], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=140, highlight=False, color_system=None)
    if view == "walk":
        table = Table(title=f"{data['domain']} vCPU {data['vcpu']}: walk of {data['va']:#x}")
        for col in ("level", "index", "entry at", "entry", "flags", "points to"):
            table.add_column(col)
        for row in data["levels"]:
            table.add_row(f"L{row['level']}", str(row["index"]), _hex(row["entry_address"]),
                          f"{row['entry']:#018x}", " ".join(row["flags"]),
                          _frame_cell(row.get("target")))
        console.print(table)
        console.print(f"root: {_frame_cell(data.get('root', {}).get('ept', data.get('root')))}")
        if "final" in data:
            console.print(f"final: {_hex(data['final']['address'])} in "
                          f"{_frame_cell(data['final'])}")
        if "fault" in data:
            console.print(f"walk stops: {data['fault']}")
    elif view == "frames" and "rows" not in data:
        table = Table(title=f"{data['domain']}: {data['frames']} frames by type")
        table.add_column("type")
        if data["kind"] == "pv":
            for col in ("frames", "pinned", "validated"):
                table.add_column(col, justify="right")
            for name, c in data["by_type"].items():
                table.add_row(name, str(c["frames"]), str(c["pinned"]), str(c["validated"]))
        else:
            table.add_column("frames", justify="right")
            for name, count in data["by_type"].items():
                table.add_row(name, str(count))
        console.print(table)
    elif view == "frames":
        table = Table(title=f"{data['domain']}: frames {data['range'][0]:#x}-{data['range'][1]:#x}")
        table.add_column("pfn")
        table.add_column("frame")
        for row in data["rows"]:
            key = row.get("pfn", row.get("gfn"))
            table.add_row(f"{key:#x}", _frame_cell(row))
        console.print(table)
    elif view == "ept":
        console.print(_frame_cell(data) + (f", {data['page']} page" if data.get("mapped") else ""))
    elif view == "lapic":
        table = Table(title=f"{data['domain']}: local APICs")
        for col in ("vCPU", "on", "TPR", "PPR", "IRR", "ISR", "TMR", "timer"):
            table.add_column(col)
        for r in data["vcpus"]:
            t = r["timer"]
            timer = (f"vec {t['vector']:#x} {t['mode']}{' masked' if t['masked'] else ''}, "
                     f"init {t['initial_count']} /{t['divide']}, "
                     + (f"next at {t['next_deadline_ns']} ns" if t["running"] else "stopped"))
            table.add_row(str(r["vcpu"]), "yes" if r["enabled"] else "no", f"{r['tpr']:#x}",
                          f"{r['ppr']:#x}", _vectors(r["irr"]), _vectors(r["isr"]),
                          _vectors(r["tmr"]), timer)
        console.print(table)
    elif view == "evtchn":
        table = Table(title=f"{data['domain']}: event channels "
                            f"({data['sent']} sent, {data['raised']} VIRQs raised)")
        for col in ("port", "state", "vCPU", "remote", "VIRQ", "pending", "masked"):
            table.add_column(col)
        for p in data["ports"]:
            remote = "" if p["remote_dom"] is None else f"d{p['remote_dom']}:{p['remote_port']}"
            table.add_row(str(p["port"]), p["state"], str(p["vcpu"]), remote,
                          "" if p["virq"] is None else str(p["virq"]),
                          _yes(p["pending"]), _yes(p["masked"]))
        console.print(table)
        for v in data["vcpus"]:
            console.print(f"vCPU {v['vcpu']}: upcall pending {_yes(v['upcall_pending'])}, "
                          f"mask {_yes(v['upcall_mask'])}")
    elif view == "vcpu":
        for r in data["vcpus"]:
            table = Table(title=f"{data['domain']} vCPU {r['vcpu']}: {r['state']} on pCPU "
                                f"{r['pcpu']}, {r['instructions']:,} instructions")
            table.add_column("register")
            table.add_column("value")
            for name, value in r.get("registers", {}).items():
                table.add_row(name, f"{value:#x}")
            for key in ("kernel_cr3", "user_cr3"):
                if key in r:
                    table.add_row(key.replace("_", " "), f"{r[key]:#x}")
            console.print(table)


def _vectors(vectors: list[int]) -> str:
    return " ".join(f"{v:#x}" for v in vectors) or "-"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# ------------------------------------------------------------------ CLI
def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise HvlabError(f"{what}: expected a number like 0x1000, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="a domain's page walks, frames, EPT, LAPIC, "
                                              "event channels or vCPUs at a moment")
    p.add_argument("source", metavar="SCENARIO|IMAGE")
    p.add_argument("--at", default="0", help="virtual time to run to first (default: 0)")
    p.add_argument("--domain", help="the domain's name (needed if there are several)")
    p.add_argument("--json", action="store_true")
    views = p.add_subparsers(dest="view", required=True)
    # --json may come before or after the view's name
    json_too = argparse.ArgumentParser(add_help=False)
    json_too.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    walk = views.add_parser("walk", help="the page walk of a guest-virtual address",
                            parents=[json_too])
    walk.add_argument("va")
    walk.add_argument("--vcpu", type=int, default=0)
    frames = views.add_parser("frames", help="frames by type, or a pseudo-physical range",
                     parents=[json_too])
    frames.add_argument("range", nargs="?", metavar="PFN[-PFN]")
    ept = views.add_parser("ept", help="the EPT translation of a guest-physical address (HVM)",
                     parents=[json_too])
    ept.add_argument("gpa")
    views.add_parser("lapic", help="IRR/ISR/TMR, TPR/PPR and timer of each vCPU (HVM)",
                     parents=[json_too])
    views.add_parser("evtchn", help="ports, pending and masked bits (PV)",
                     parents=[json_too])
    views.add_parser("vcpu", help="registers and page-table roots of each vCPU",
                     parents=[json_too])
    p.set_defaults(func=run)


def run(args) -> int:
    from hypervisor.scenario import parse_time

    at = 0 if args.at in ("0", "0s") else parse_time(args.at, "--at")
    hv = open_machine(args.source, at)
    dom = pick_domain(hv, args.domain)
    if args.view == "walk":
        if not 0 <= args.vcpu < len(dom.vcpus):
            raise HvlabError(f"--vcpu {args.vcpu}: domain {dom.name} has {len(dom.vcpus)} vCPUs")
        data = walk_view(hv, dom, _number(args.va, "VA") & (1 << 64) - 1, args.vcpu)
    elif args.view == "frames":
        if args.range is None:
            data = frames_view(hv, dom)
        else:
            first, _, last = args.range.partition("-")
            data = frames_view(hv, dom, _number(first, "PFN"), _number(last or first, "PFN"))
    elif args.view == "ept":
        data = ept_view(hv, dom, _number(args.gpa, "GPA"))
    else:
        data = {"lapic": lapic_view, "evtchn": evtchn_view, "vcpu": vcpu_view}[args.view](hv, dom)
    data = {"source": args.source, "at_ns": at, **data}
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_view(args.view, data, sys.stdout)
    return 0
