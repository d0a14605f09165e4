"""End to end: HVM guest kernels under the full hypervisor, through the CLI."""

from __future__ import annotations

import re

import pytest

from hypervisor.cli import main
from hypervisor.scenario import ScenarioError, load_scenario
from tests import GUESTS, SCENARIOS
from tests.results import run_json, stable


def test_hvm_lapic_counts_ticks_ipis_and_device_interrupts_identically_twice(capsys):
    first = run_json(capsys, "hvm-lapic.toml")
    second = run_json(capsys, "hvm-lapic.toml")
    assert stable(first) == stable(second)
    (dom,) = first["domains"]
    assert dom["type"] == "hvm" and dom["crash_report"] is None, dom["console"]
    assert dom["shutdown"]["reason"] == "poweroff" and dom["shutdown"]["code"] == 0, \
        dom["console"]
    assert "all checks passed" in dom["console"]
    v0, v1 = dom["vcpus"]
    assert {v0["pcpu"], v1["pcpu"]} == {0, 1}
    for v in (v0, v1):
        period = v["timer_period_ns"]
        assert period == 50_000 and v["timer_coalesced"] == 0
        # ticks = the time the periodic timer ran / its period, within one
        assert abs(v["timer_ticks"] - v["timer_ns"] // period) <= 1
        assert v["timer_ticks"] >= 50
        assert v["ipis_sent"] == v["ipis_received"] == 50
        (source,) = v["sources"]
        # every posted device interrupt delivered exactly once, none lost on the way
        assert source["posted"] == source["delivered"] == {"disk": 100, "nic": 150}[
            source["name"]]
        assert source["coalesced"] == source["irr_coalesced"] == source["dropped"] == 0
    # the guest's own view agrees with the hypervisor's counts
    for v in (v0, v1):
        m = re.search(rf"vcpu{v['id']}: (\d+) timer ticks in (\d+) ns", dom["console"])
        assert m and int(m.group(1)) == v["timer_ticks"]
    # a reserved LAPIC register write: ESR says "illegal register address", no crash
    assert v0["esr"] == 0x80 and "ESR after writing reserved register 0x3f0 = 0x80 ok" in \
        dom["console"]
    assert first["exits"]["lapic_write"] > 0 and first["exits"]["halt"] > 0
    assert dom["hvm"]["ept_violations"] == {"lapic": 2}  # one first touch per vCPU
    assert dom["hvm"]["ept_leaves"]["2M"] == 8  # 16 MiB backed by 2 MiB superpages
    # vCPU1 went down with cli; hlt (Xen's hvm_hlt); sleeping cost no instructions
    assert v1["state"] == "down"
    assert first["instructions"] < first["virtual_ns"] * 2 * 0.5


def test_hvm_lapic_text_report_shows_per_vcpu_interrupt_counts(capsys):
    assert main(["run", str(SCENARIOS / "hvm-lapic.toml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"lapic/v0: \d+ timer ticks, IPIs 50 sent / 50 received, "
                     r"disk 100 posted / 100 delivered", out)
    assert "nic 150 posted / 150 delivered" in out


def test_hvm_memtouch_populates_on_demand(capsys):
    result = run_json(capsys, "hvm-memtouch.toml")
    (dom,) = result["domains"]
    assert dom["shutdown"]["code"] == 0, dom["console"]
    m = re.search(r"touching (\d+) pages", dom["console"])
    touched = int(m.group(1))
    hvm = dom["hvm"]
    assert hvm["populate_on_demand"] is True
    assert hvm["pod_pages_populated"] == touched  # exactly the pages the guest touched
    assert hvm["pod_superpage_faults"] >= 1
    assert hvm["ept_violations"] == {"populate_on_demand": hvm["pod_faults"]}
    assert result["exits"]["ept_violation"] == hvm["pod_faults"]
    assert result["tlb_fills"] > 8 * touched  # every round refills every page


def test_an_ept_violation_at_an_unmapped_gpa_crashes_only_that_domain(capsys):
    result = run_json(capsys, "hvm-crash.toml")
    crashed, hello = result["domains"]
    assert crashed["shutdown"]["reason"] == "crash"
    report = crashed["crash_report"]
    assert re.search(r"^crasher/v0: EPT violation at GPA 0x7fff0000 \(read, nothing mapped "
                     r"there\), guest-virtual 0x1000 at RIP 0x[0-9a-f]+: "
                     r"mov rax, qword ptr \[0x1000\];", report), report
    assert hello["shutdown"] == {"reason": "poweroff", "code": 0,
                                 "virtual_ns": hello["shutdown"]["virtual_ns"]}


def test_an_hvm_kernel_linked_outside_guest_memory_is_one_line_exit_2(tmp_path, capsys):
    scenario = tmp_path / "bad.toml"
    scenario.write_text(f'[machine]\n[[domain]]\nname = "x"\ntype = "hvm"\n'
                        f'kernel = "{GUESTS / "pv_hello.elf"}"\nmemory = "8M"\n')
    assert main(["run", str(scenario)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("hvlab: domain x: kernel pv_hello.elf is linked at "
                           "0xffffffff80000000")
    assert "outside the domain's guest-physical memory" in line and not captured.out


def test_scenario_hvm_keys(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[machine]\n[[domain]]\nname = "h"\ntype = "hvm"\nkernel = "k.elf"\n'
                    'pod = true\nvcpus = 2\n[[domain.source]]\nname = "a"\nvcpu = 1\n'
                    'vector = 0x60\nperiod = "10us"\ncount = 5\n')
    (dom,) = load_scenario(path).domains
    assert dom.type == "hvm" and dom.pod
    (src,) = dom.sources
    assert (src.name, src.vcpu, src.vector, src.period_ns, src.start_ns, src.count) == \
        ("a", 1, 0x60, 10_000, None, 5)


@pytest.mark.parametrize(("body", "message"), [
    ('name = "p"\nkernel = "k.elf"\npod = true\n', r"'pod' and \[\[domain.source\]\] are for"),
    ('name = "h"\ntype = "hvm"\nimage = "x.img"\npod = true\n',
     "an image brings its own memory and devices"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\npod = 1\n', "'pod' must be true or false"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\n[[domain.source]]\nname = "a"\nvector = 16\n'
     'period = "1us"\n', "'vector' must be 32..255"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\n[[domain.source]]\nname = "a"\nvcpu = 1\n'
     'vector = 40\nperiod = "1us"\n', "'vcpu' must be 0..0"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\n[[domain.source]]\nname = "a"\nvector = 40\n'
     'period = "soon"\n', "source 'a' period: expected a time"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\n[[domain.source]]\nname = "a"\nvector = 40\n'
     'period = "1us"\nrate = 3\n', "unknown key 'rate'"),
    ('name = "h"\ntype = "hvm"\nkernel = "k"\n[[domain.source]]\nname = "a"\nvector = 40\n'
     'period = "1us"\n[[domain.source]]\nname = "b"\nvector = 40\nperiod = "2us"\n',
     "share a vCPU and a vector"),
])
def test_bad_hvm_scenarios_name_the_problem(tmp_path, body, message):
    path = tmp_path / "s.toml"
    path.write_text("[machine]\n[[domain]]\n" + body)
    with pytest.raises(ScenarioError, match=message):
        load_scenario(path)
