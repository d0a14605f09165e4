"""The `hvlab` command line."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import NoReturn

from hypervisor.lib.errors import HvlabError, report_failure, terminate_by_exception


def _cmd_run(args: argparse.Namespace) -> int:
    from hypervisor.runner import print_report, run_scenario
    from hypervisor.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    if scenario.updates:  # the scenario's own [[update]]s: the same as `hvlab update`
        if args.gdb is not None:
            raise HvlabError(f"{args.scenario}: --gdb is not supported with live updates")
        args.at = args.to = args.strategy = args.fail_at = args.costs = None
        args.corrupt_stream = args.keep_handover = None
        args.exec_ = False
        return _cmd_update(args)
    trace = sys.stderr if args.trace else None
    result = run_scenario(scenario, trace=trace, trace_limit=args.trace_limit, gdb=args.gdb)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(result)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from hypervisor.runner import trace_scenario
    from hypervisor.scenario import parse_time
    from hypervisor.tracing import TraceOptions, parse_registers

    start = 0 if args.from_ in (None, "0") else parse_time(args.from_, "--from")
    stop = None if args.to is None else parse_time(args.to, "--to")
    if stop is not None and stop <= start:
        raise HvlabError("--to must come after --from")
    options = TraceOptions(domain=args.domain, vcpu=args.vcpu, window=(start, stop),
                           registers=parse_registers(args.regs), memory=args.mem,
                           format=args.format)
    trace_scenario(args.scenario, sys.stdout, args.limit, options, args.rip)
    return 0


def _cmd_save(args: argparse.Namespace) -> int:
    from hypervisor.images.domains import save_domain
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario, parse_time

    scenario = load_scenario(args.scenario)
    at = parse_time(args.at, "--at")
    _check_output(args.output)
    hv = boot_scenario(scenario)
    hv.run(at)
    dom = next((d for d in hv.domains if d.name == args.domain), None)
    if dom is None:
        names = ", ".join(d.name for d in hv.domains)
        raise HvlabError(f"{args.scenario}: no domain '{args.domain}' (domains: {names})")
    stats = save_domain(hv, dom, args.output)
    if args.json:
        json.dump({"image": args.output, "at_ns": at, **stats}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"saved {dom.name} at {at / 1e6:.3f} ms virtual to {args.output}: "
              f"{stats['pages']} pages ({stats['data_pages']} with data, {stats['page_tables']} "
              f"page tables, {stats['pins']} pinned), {stats['bytes']:,} bytes")
    return 0


def _check_output(path: str) -> None:
    """An output file goes into a folder that exists (checked before any work)."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise HvlabError(f"-o {path}: no folder {folder}")
    if Path(path).is_dir():
        raise HvlabError(f"-o {path}: is a folder, not a file")


def _cmd_update(args: argparse.Namespace) -> int:
    from hypervisor.liveupdate.costs import load_costs
    from hypervisor.liveupdate.orchestrator import UpdatePlan
    from hypervisor.runner import print_update_run, run_with_updates
    from hypervisor.scenario import UpdateSpec, load_scenario, parse_time

    scenario = load_scenario(args.scenario)
    updates = list(scenario.updates)
    if args.at is not None:
        if args.to is None or args.strategy is None:
            raise HvlabError("--at needs --to BUILD and --strategy S")
        updates = [UpdateSpec(parse_time(args.at, "--at"), args.to, args.strategy)]
    elif args.to is not None or args.strategy is not None:  # re-aim the scenario's updates
        updates = [UpdateSpec(u.at_ns, args.to or u.to, args.strategy or u.strategy)
                   for u in updates]
    if not updates:
        raise HvlabError(f"{args.scenario}: no [[update]] in the scenario and no --at given")
    plan = UpdatePlan(to_build=updates[0].to, strategy=updates[0].strategy,
                      fail_at=args.fail_at, corrupt_stream=args.corrupt_stream == "final",
                      corrupt_precopy=args.corrupt_stream == "precopy",
                      costs=load_costs(args.costs), exec_new_process=args.exec_)
    keep = None if args.keep_handover is None else Path(args.keep_handover)
    # with --exec the process that finishes the run (and prints) is a new one
    result = run_with_updates(scenario, updates, plan, "json" if args.json else "text",
                              keep_handover=keep)
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_update_run(result)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "revalidate" and args.image is not None:
        from hypervisor.bench.revalidate_image import run_revalidate_image_bench

        if args.mem is not None:
            raise HvlabError("bench revalidate: --image takes the guest's size from the image; "
                             "leave out --mem")
        run_revalidate_image_bench(args.image, args.build, args.json, repeats=args.repeat,
                                   quiet=args.quiet)
        return 0
    if args.which == "revalidate":
        from hypervisor.bench.revalidate import run_revalidate_bench
        from hypervisor.scenario import parse_size

        run_revalidate_bench(parse_size(args.mem or "1G", "--mem"), args.build, args.json,
                             quiet=args.quiet)
        return 0
    if args.which == "linux":
        from hypervisor.bench.linux import run_linux_bench

        if args.scenario is None:
            run_linux_bench(args.json)
        else:
            run_linux_bench(args.json, Path(args.scenario))
        return 0
    if args.which == "update":
        from hypervisor.bench.update import run_update_bench

        run_update_bench(args.json, sizes=args.sizes, repeat=args.repeat, quiet=args.quiet)
        return 0
    from hypervisor.bench.emulator import run_bench

    return run_bench(args)


def _cmd_image(args: argparse.Namespace) -> int:
    from hypervisor import images

    if args.action == "info":
        images.image_info(args.image, args.json)
        return 0
    if args.action == "verify":
        verdict = images.image_verify(args.image)
        return 0 if verdict["ok"] else 2
    if args.action == "frames":
        from hypervisor.images import frames
        from hypervisor.runner import scenario_frames

        if args.image.endswith(".toml") != (args.at is not None):
            raise HvlabError("image frames: a scenario (.toml) needs --at T; an image takes "
                             "no --at")
        columns = (scenario_frames(args.image, args.at, args.domain) if args.at
                   else frames.image_frames(args.image))
        if args.csv:
            frames.write_csv(columns, sys.stdout)
        else:
            json.dump(frames.summary(columns), sys.stdout, indent=2)
            sys.stdout.write("\n")
        return 0
    from hypervisor.scenario import parse_size

    _check_output(args.output)
    text = io.StringIO() if args.json else sys.stdout  # --json: stdout is the JSON alone
    stats = images.image_make("pv", parse_size(args.mem, "--mem"), args.layout, args.seed,
                              args.output, out=text, quiet=args.quiet)
    if args.json:
        json.dump(stats, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from hypervisor.teaching import labs

    if args.action == "list":
        found = labs.list_labs()
        if args.json:
            json.dump({"labs": found}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            labs.print_list(found)
        return 0
    result = labs.check_lab(args.name, args.dir)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        labs.print_check(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hypervisor.teaching.demo import run_demo

    return run_demo(fast=args.fast)


class _Parser(argparse.ArgumentParser):
    """Bad options are bad input like any other: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvlab", description=(
        "An x86-64 hypervisor emulator for live-update research and teaching labs."))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario")
    run.add_argument("scenario")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--trace", action="store_true",
                     help="also print disassembled execution to stderr")
    run.add_argument("--trace-limit", type=_positive, default=10_000, metavar="N")
    run.add_argument("--gdb", metavar="HOST:PORT",
                     help="wait for gdb (target remote HOST:PORT) before the first instruction; "
                          "port 0 picks a free one")
    run.set_defaults(func=_cmd_run)

    trace = sub.add_parser("trace", help="print disassembled execution per vCPU")
    trace.add_argument("scenario")
    trace.add_argument("--limit", type=_positive, default=2_000, metavar="N",
                       help="stop after N trace lines (default 2000)")
    trace.add_argument("--domain", help="only this domain's vCPUs")
    trace.add_argument("--vcpu", type=int, metavar="N", help="only vCPU N (of each domain)")
    trace.add_argument("--rip", metavar="LO-HI",
                       help="only instructions in this range (inclusive); numbers or guest "
                            "symbols, or one symbol for all of it, e.g. check_value")
    trace.add_argument("--from", dest="from_", metavar="T", help="virtual time to start at")
    trace.add_argument("--to", metavar="T", help="virtual time to stop at")
    trace.add_argument("--regs", metavar="LIST", help="registers to show, e.g. rax,rdi,rsp")
    trace.add_argument("--mem", action="store_true",
                       help="show the data addresses each instruction accesses")
    trace.add_argument("--format", choices=["text", "jsonl"], default="text")
    trace.set_defaults(func=_cmd_trace)

    save = sub.add_parser("save", help="run a scenario to a time, then save one domain")
    save.add_argument("scenario")
    save.add_argument("--domain", required=True, help="the domain's name in the scenario")
    save.add_argument("--at", required=True, help="virtual time, e.g. 2ms")
    save.add_argument("-o", "--output", required=True, help="image file (.zst compresses)")
    save.add_argument("--json", action="store_true")
    save.set_defaults(func=_cmd_save)

    update = sub.add_parser("update", help="run a scenario through a live update")
    update.add_argument("scenario")
    update.add_argument("--at", help="virtual time of the update (else the scenario's [[update]])")
    update.add_argument("--to", help="the build to update to, e.g. 4.12")
    update.add_argument("--strategy", help="full-walk | transfer | lazy | prevalidate")
    update.add_argument("--fail-at", metavar="PHASE",
                        help="inject a failure in a phase: pause, save, teardown, restore, "
                             "typerefs, resume")
    update.add_argument("--corrupt-stream", nargs="?", const="final",
                        choices=["final", "precopy"],
                        help="damage a hand-over stream on disk before it is read back: one "
                             "written at the pause (final, the default) or one sent ahead "
                             "(precopy)")
    update.add_argument("--keep-handover", metavar="DIR",
                        help="keep each update's hand-over in DIR/update-N (DIR new or "
                             "empty); by default it is removed when the update is over")
    update.add_argument("--costs", metavar="FILE", help="JSON overrides of the cost table")
    update.add_argument("--exec", dest="exec_", action="store_true",
                        help="run the new build in a fresh process on the same (file-backed) "
                             "host memory")
    update.add_argument("--json", action="store_true")
    update.set_defaults(func=_cmd_update)

    bench = sub.add_parser("bench", help="benchmarks (ratios measured in one run)")
    bench.add_argument("which", choices=["emulator", "revalidate", "update", "linux"])
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.add_argument("--mem", help="revalidate: guest memory (default 1G)")
    bench.add_argument("--image", metavar="IMAGE",
                       help="revalidate: a PV image's own page tables instead of a generated "
                            "guest")
    bench.add_argument("--build", default="4.19", help="revalidate: the build's layout")
    bench.add_argument("--scenario", default=None,
                       help="linux: the scenario to boot (default scenarios/linux-pv.toml; "
                            "scenarios/linux-pv-smp.toml for 2 vCPUs)")
    bench.add_argument("--sizes", default="1G,4G,16G,64G",
                       help="update: guest sizes, comma-separated (default 1G,4G,16G,64G)")
    bench.add_argument("--repeat", type=_positive, default=3,
                       help="update: updates measured per strategy and size; a row is the "
                            "run with the median blackout; revalidate --image: bulk and scan "
                            "runs, the best is kept (default 3)")
    bench.set_defaults(func=_cmd_bench)

    image = sub.add_parser("image", help="stored guest images (migration stream v2)")
    image_sub = image.add_subparsers(dest="action", required=True)
    info = image_sub.add_parser("info", help="records, sizes, page types, pins, vCPUs")
    info.add_argument("image")
    info.add_argument("--json", action="store_true")
    verify = image_sub.add_parser("verify", help="structure and page-table validity")
    verify.add_argument("image")
    frames = image_sub.add_parser("frames", help="per-frame type state (restored, or a "
                                  "scenario's domain at --at T)")
    frames.add_argument("image", help="an image, or a scenario (.toml) with --at")
    frames.add_argument("--at", help="scenario: virtual time to read the frames at, e.g. 2ms")
    frames.add_argument("--domain", help="scenario: the domain (if it has several)")
    frames.add_argument("--csv", action="store_true",
                        help="one CSV row per frame: pfn, mfn, type, type_count, pinned, "
                             "validated, general_count (else a JSON summary)")
    make = image_sub.add_parser("make", help="generate a large PV guest image")
    make.add_argument("--pv", action="store_true",
                      help="a PV guest (the only kind generated; optional)")
    make.add_argument("--mem", required=True, help="guest memory, e.g. 64G")
    make.add_argument("--layout", default="linux-like",
                      choices=["linux-like", "dense", "sparse", "aliased"])
    make.add_argument("--seed", type=int, default=1)
    make.add_argument("-o", "--output", required=True)
    make.add_argument("--json", action="store_true")
    make.add_argument("--quiet", action="store_true", help="no progress on stderr")
    image.set_defaults(func=_cmd_image)

    lab = sub.add_parser("lab", help="graded teaching labs (scenarios/labs)")
    lab_sub = lab.add_subparsers(dest="action", required=True)
    lab_list = lab_sub.add_parser("list", help="the labs and their titles")
    lab_list.add_argument("--json", action="store_true")
    lab_check = lab_sub.add_parser("check", help="grade a lab: score and every check")
    lab_check.add_argument("name")
    lab_check.add_argument("--dir", help="grade the files in this folder (a copy of the lab)")
    lab_check.add_argument("--json", action="store_true")
    lab.set_defaults(func=_cmd_lab)

    demo = sub.add_parser("demo", help="a guided tour: boot, page walk, attack, live update")
    demo.add_argument("--fast", action="store_true",
                      help="no pauses (also when stdout is not a terminal)")
    demo.set_defaults(func=_cmd_demo)

    from hypervisor.teaching import inspect

    inspect.register(sub)

    from hypervisor.research.cli import register as register_research

    register_research(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_by_exception():  # SIGTERM unwinds: temporary files are removed
            return args.func(args)
    except BrokenPipeError:
        return 0
    except BaseException as err:  # one line and the status of its kind (lib/errors.py)
        if isinstance(err, SystemExit):
            raise
        return report_failure(err)


if __name__ == "__main__":
    sys.exit(main())
