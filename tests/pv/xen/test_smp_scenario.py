"""The 2-vCPU Linux scenario and the refusals around vCPU counts, through the CLI."""

from __future__ import annotations

from hypervisor.cli import main
from hypervisor.scenario import load_scenario
from tests import ROOT
from tests.pv.xen.guest import Asm, kernel_elf

SMP = ROOT / "scenarios" / "linux-pv-smp.toml"


def test_the_smp_scenario_is_the_linux_one_on_two_vcpus_and_two_pcpus():
    smp, one = load_scenario(SMP), load_scenario(ROOT / "scenarios" / "linux-pv.toml")
    assert smp.pcpus == 2 and smp.domains[0].vcpus == 2
    (d,), (d1,) = smp.domains, one.domains
    assert (d.kernel, d.busybox, d.cmdline, d.memory) == (d1.kernel, d1.busybox, d1.cmdline,
                                                         d1.memory)


def test_a_linux_domain_with_too_many_vcpus_is_one_line_and_status_2(tmp_path, capsys):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(kernel_elf(Asm().shutdown(0).bytes()))
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[machine]\npcpus = 2\nmemory = "64M"\n\n[[domain]]\nname = "l"\n'
                        f'kernel = "{kernel}"\nmemory = "8M"\nvcpus = 33\n')
    assert main(["run", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vcpus must be 1..32, got 33" in err
    two = scenario.read_text().replace("vcpus = 33", "vcpus = 2")
    scenario.write_text(two)
    assert main(["run", str(scenario)]) == 0  # boots, vCPU 1 stays down, powers off


def test_bench_linux_takes_a_scenario_and_refuses_a_missing_one(tmp_path, capsys):
    assert main(["bench", "linux", "--scenario", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such scenario file" in err
