"""Live updates paused in states that are legal but rare: each must prove and finish."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hypervisor.lib.errors import INTERNAL_FAILURE
from hypervisor.liveupdate import resume
from hypervisor.liveupdate.driver import RESUME_FILE
from hypervisor.liveupdate.orchestrator import UpdatePlan
from hypervisor.mm.builds import PageType
from hypervisor.runner import boot_scenario, run_with_updates
from hypervisor.scenario import UpdateSpec, load_scenario
from tests import SCENARIOS

STRATEGIES = ["full-walk", "transfer", "prevalidate", "lazy"]
ON_SECOND_ROOT_NS = 3_191_000  # pv-ptchurn is on its second L4 (NEW_BASEPTR), 3.187-3.196 ms


def _update(name: str, at_ns: int, strategy: str, to: str = "4.12") -> dict:
    scenario = load_scenario(SCENARIOS / name)
    return run_with_updates(scenario, [UpdateSpec(at_ns, to, strategy)], UpdatePlan(to, strategy))


def _proved_and_finished(result: dict) -> None:
    (report,) = result["updates"]
    assert report["outcome"] == "updated", report
    assert report["proof"]["ok"], report["proof"]["problems"]
    if "proof_after_lazy" in report:
        assert report["proof_after_lazy"]["ok"], report["proof_after_lazy"]["problems"]
    assert all(d["shutdown"]["code"] == 0 for d in result["domains"]), result["domains"]
    assert all(d["typeref_differences"] == [] for d in result["domains"])


def test_at_that_moment_the_guest_runs_on_its_second_root():
    """What the tests below rely on, and what the guest sees: its CR3 follows NEW_BASEPTR."""
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-ptchurn.toml"))
    (v,) = hv.domains[0].vcpus
    first_root = v.roots.kernel_ma
    hv.run(ON_SECOND_ROOT_NS)
    assert v.roots.kernel_ma != first_root
    assert hv.read_vcpu_registers(v)["cr3"] == v.roots.kernel_ma


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_update_while_the_guest_runs_on_its_second_root(strategy):
    _proved_and_finished(_update("pv-ptchurn.toml", ON_SECOND_ROOT_NS, strategy))


def test_an_exec_update_while_the_guest_runs_on_its_second_root():
    done = subprocess.run(
        [sys.executable, "-m", "hypervisor.cli", "update", str(SCENARIOS / "pv-ptchurn.toml"),
         "--at", f"{ON_SECOND_ROOT_NS // 1000}us", "--to", "4.12", "--strategy", "full-walk",
         "--exec", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _proved_and_finished(json.loads(done.stdout))


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps(("a run", "a blackout"))])
def test_a_failure_in_the_new_process_is_reported_in_one_line(tmp_path, capsys, content):
    """Past the point of no return nothing can be undone: the new build reports its
    own failure as hvlab's (not the user's), never as a traceback."""
    (tmp_path / RESUME_FILE).write_bytes(content)
    assert resume.main([str(tmp_path)]) == INTERNAL_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("hvlab: internal failure") and err.count("\n") == 1



# ------------------------------------------------------- lazy, then a vCPU is initialised
BEFORE_SECOND_VCPU_NS = [0, 500, 1_000, 2_000, 2_800]


def test_at_those_moments_the_second_vcpu_is_not_initialised_yet():
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-smp.toml"))
    for at_ns in BEFORE_SECOND_VCPU_NS:
        hv.run(at_ns)
        assert hv.domains[0].vcpus[1].context is None


@pytest.mark.parametrize("at_ns", BEFORE_SECOND_VCPU_NS)
def test_lazy_while_the_guest_initialises_its_second_vcpu(at_ns):
    """VCPUOP_initialise takes a CR3 reference during the lazy period: it must count once,
    and the lazy proof must compare the state the old build had."""
    _proved_and_finished(_update("pv-smp.toml", at_ns, "lazy"))


def test_lazy_to_another_build_while_the_guest_initialises_its_second_vcpu():
    _proved_and_finished(_update("pv-smp.toml", 1_000, "lazy", to="4.4"))


# ------------------------------------------------------------- the user page table in images
def _saved_with_a_user_table(tmp_path) -> tuple[Path, int]:
    """pv-ptchurn saved while NEW_USER_BASEPTR holds its second L4: (image, that L4's pfn)."""
    from hypervisor.images.domains import save_domain

    hv = boot_scenario(load_scenario(SCENARIOS / "pv-ptchurn.toml"))
    hv.run(ON_SECOND_ROOT_NS)
    dom = hv.domains[0]
    user_ma = dom.vcpus[0].roots.user_ma
    assert user_ma, "the guest holds no user page table at this moment"
    path = tmp_path / "ptchurn.img"
    save_domain(hv, dom, path)
    return path, int(hv.m2p[user_ma >> 12])


def _vcpu0_ctrlreg1_offset(image: bytes) -> int:
    from hypervisor.stream.records import RecordType
    from tests.image_surgery import records_at

    body_at = next(pos + 8 for pos, rtype, body in records_at(image)
                   if rtype == RecordType.X86_PV_VCPU_BASIC and body[:4] == bytes(4))
    return body_at + 8 + 4984 + 8  # vcpu_id and reserved, then ctrlreg[1]


def test_a_saved_user_page_table_is_in_xens_encoding(tmp_path):
    path, user_pfn = _saved_with_a_user_table(tmp_path)
    image = path.read_bytes()
    at = _vcpu0_ctrlreg1_offset(image)
    assert int.from_bytes(image[at : at + 8], "little") == 1 | user_pfn << 12


@pytest.mark.parametrize("xen_encoding", [True, False])
def test_either_user_page_table_encoding_verifies_and_restores(tmp_path, xen_encoding):
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain
    from hypervisor.images.verify import image_verify

    path, user_pfn = _saved_with_a_user_table(tmp_path)
    image = bytearray(path.read_bytes())
    at = _vcpu0_ctrlreg1_offset(bytes(image))
    field = (1 if xen_encoding else 0) | user_pfn << 12
    image[at : at + 8] = field.to_bytes(8, "little")
    path.write_bytes(bytes(image))
    verdict = image_verify(path, out=io.StringIO())
    assert verdict["ok"], verdict
    hv = Hypervisor(MachineConfig(1, 64 << 20))
    dom = restore_domain(hv, path)
    assert dom.vcpus[0].roots.user_ma == int(dom.p2m[user_pfn]) << 12
    hv.run(10_000_000)
    assert dom.shutdown is not None and dom.shutdown.code == 0


# ------------------------------------------- a legal linear entry onto a later-pinned L4
LINKED_L4S_NS = 70_000  # pv-hostile holds a read-only L4 entry onto its second, pinned L4


def _linked_l4_image(tmp_path) -> Path:
    from hypervisor.images.domains import save_domain

    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hostile.toml"))
    hv.run(LINKED_L4S_NS)
    path = tmp_path / "hostile.img"
    save_domain(hv, hv.domains[0], path)
    return path


def test_an_image_holding_a_linear_l4_entry_verifies_restores_and_finishes(tmp_path):
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain
    from hypervisor.images.verify import image_verify

    path = _linked_l4_image(tmp_path)
    verdict = image_verify(path, out=io.StringIO())
    assert verdict["ok"], verdict
    hv = Hypervisor(MachineConfig(1, 64 << 20))
    dom = restore_domain(hv, path)
    ft = hv.frame_table
    mfns = dom.p2m.astype(np.int64)
    linking = mfns[ft.linear_pt_count[mfns] > 0]
    assert linking.size and all(ft.info(int(m)).type == PageType.L4 for m in linking)
    # the linking L4 comes first in pfn order, so the saved pins list it before its target
    target = mfns[ft.linear_pt_count[mfns] < 0]
    assert int(hv.m2p[int(linking[0])]) < int(hv.m2p[int(target[0])])
    assert hv.check_typerefs(dom) == []
    hv.run(10_000_000)
    assert dom.shutdown is not None and dom.shutdown.code == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_update_while_an_l4_links_to_a_later_pinned_l4(strategy):
    _proved_and_finished(_update("pv-hostile.toml", LINKED_L4S_NS, strategy))


# ----------------------------------- an L4 that only a linear entry holds (its pin dropped)
def _as_guest(hv, dom, cmd: int, mfn: int) -> int:
    """One mmuext_op from the domain's vCPU 0, through the hypervisor's own path."""
    from hypervisor.pv.hypercalls import VcpuMmuContext
    from hypervisor.pv.mmu_ops import do_mmuext_op
    from hypervisor.pv.vcpu import finish_pending_typing

    finish_pending_typing(dom)
    rc, _ = do_mmuext_op(VcpuMmuContext(hv, dom.vcpus[0]), [[cmd, mfn, 0]])
    return rc


def _linear_target(hv, dom) -> int:
    mfns = dom.p2m.astype(np.int64)
    (target,) = mfns[hv.frame_table.linear_pt_count[mfns] < 0]
    return int(target)


def _linked_then_unpinned():
    """pv-hostile while its L4 links its second L4, B, read-only; then, as the guest may,
    B is unpinned: B stays a validated L4 held by that linear entry alone, a state no
    order of the remaining roots validates by itself."""
    from hypervisor.pv.mmu_ops import MMUEXT_UNPIN_TABLE

    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hostile.toml"))
    hv.run(LINKED_L4S_NS)
    dom = hv.domains[0]
    b = _linear_target(hv, dom)
    assert _as_guest(hv, dom, MMUEXT_UNPIN_TABLE, b) == 0
    info = hv.frame_table.info(b)
    assert (info.type, info.count, info.pinned, info.validated) == (PageType.L4, 1, False, True)
    return hv


def _type_rows(hv, dom) -> list[tuple]:
    """Per pfn, in the build's own layout decoded: type, type count, pinned, validated,
    general count, linear count."""
    ft, mfns = hv.frame_table, dom.p2m.astype(np.int64)
    ti, layout = ft.type_info[mfns], ft.layout
    rows = zip(layout.type_of(ti).tolist(), layout.count_of(ti).tolist(),
               layout.pinned_of(ti).tolist(), layout.validated_of(ti).tolist(),
               ft.count_info[mfns].tolist(), ft.linear_pt_count[mfns].tolist(), strict=True)
    # a type no reference holds any more (e.g. the .bss page whose mapping xen_entry gave
    # to shared_info) is no one's: a running domain keeps it, an image or hand-over not
    return [(0, 0, False, False, *row[4:]) if row[1] == 0 and not row[2] else row
            for row in rows]


def _repin_and_finish(hv, dom) -> None:
    """The guest later removes the link and unpins B itself: give B its pin back first,
    then the guest must finish as it does without the detour."""
    from hypervisor.pv.mmu_ops import MMUEXT_PIN_L4_TABLE

    assert _as_guest(hv, dom, MMUEXT_PIN_L4_TABLE, _linear_target(hv, dom)) == 0
    hv.run(10_000_000)
    assert dom.shutdown is not None and dom.shutdown.code == 0, dom.console[-400:]


def test_an_image_where_only_a_linear_entry_holds_an_l4_verifies_and_restores(tmp_path):
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain, save_domain
    from hypervisor.images.verify import image_verify

    old = _linked_then_unpinned()
    path = tmp_path / "hostile.img"
    save_domain(old, old.domains[0], path)
    verdict = image_verify(path, out=io.StringIO())
    assert verdict["ok"], verdict
    hv = Hypervisor(MachineConfig(1, 64 << 20), build=old.build)
    dom = restore_domain(hv, path)
    assert _type_rows(hv, dom) == _type_rows(old, old.domains[0])
    assert hv.check_typerefs(dom) == []
    _repin_and_finish(hv, dom)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_update_while_only_a_linear_entry_holds_an_l4(strategy):
    from hypervisor.liveupdate.orchestrator import live_update, prepare

    old = _linked_then_unpinned()
    before = _type_rows(old, old.domains[0])
    plan = UpdatePlan("4.12", strategy)
    hv, report = live_update(old, plan, prepare(old, plan))
    assert report["outcome"] == "updated", report
    assert report["proof"]["ok"], report["proof"]["problems"]
    dom = hv.domains[0]
    hv.finish_background_work()
    if strategy == "lazy":
        assert report["proof_after_lazy"]["ok"], report["proof_after_lazy"]["problems"]
    assert hv.check_typerefs(dom) == []
    assert _type_rows(hv, dom) == before
    _repin_and_finish(hv, dom)
