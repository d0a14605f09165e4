"""Scenario files: strict parsing, and one clear line for every bad input."""

from __future__ import annotations

import pytest

from hypervisor.cli import main
from hypervisor.scenario import ScenarioError, load_scenario, parse_size, parse_time
from tests import SCENARIOS

GOOD = """
[machine]
pcpus = 2
memory = "32M"

[[domain]]
name = "a"
kernel = "k.elf"
memory = "2M"
vcpus = 2

[limits]
virtual_time = "250ms"
"""


def write(tmp_path, text: str):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_good_scenario_parses(tmp_path):
    s = load_scenario(write(tmp_path, GOOD))
    assert (s.pcpus, s.memory, s.virtual_time_ns, s.quantum_ns) == (2, 32 << 20, 250_000_000,
                                                                     1_000_000)
    (d,) = s.domains
    assert (d.name, d.memory, d.vcpus, d.type) == ("a", 2 << 20, 2, "pv")
    assert d.kernel == (tmp_path / "k.elf").resolve()


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("pcpus = 2", "pcpus = 2\ncolour = 1"), "unknown key 'colour'"),
    (GOOD.replace("vcpus = 2", "vcpu = 2"), "unknown key 'vcpu'"),
    (GOOD.replace('memory = "2M"', 'memory = "lots"'), "expected a size"),
    (GOOD.replace("pcpus = 2", 'pcpus = "two"'), "'pcpus' must be a positive integer"),
    (GOOD.replace('virtual_time = "250ms"', 'virtual_time = "soon"'), "expected a time"),
    (GOOD.replace('name = "a"', ""), "missing key 'name'"),
    ("[machine]\npcpus = 1\n", "needs at least one [[domain]]"),
    ("[machine\n", "not valid TOML"),
    (GOOD + '\n[[domain]]\nname = "a"\nkernel = "k.elf"\n', "names must be unique"),
    (GOOD.replace('name = "a"', 'name = "a"\ntype = "kvm"'), "type must be \"pv\" or \"hvm\""),
])
def test_bad_scenarios_name_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(path)


def test_units():
    assert parse_size("4K", "x") == 4096 and parse_size("1G", "x") == 1 << 30
    assert parse_size(8192, "x") == 8192
    assert parse_time("3us", "x") == 3000 and parse_time("2s", "x") == 2 * 10**9
    with pytest.raises(ScenarioError):
        parse_size(-1, "x")


def run_cli(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_missing_kernel_is_one_line_and_status_2(tmp_path, capsys):
    status, out, err = run_cli(["run", str(write(tmp_path, GOOD))], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "no such file" in err.lower() and "k.elf" in err


def test_non_elf_kernel_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "k.elf").write_bytes(b"MZ this is not an ELF file" * 10)
    status, _, err = run_cli(["run", str(write(tmp_path, GOOD))], capsys)
    # neither an ELF nor a bzImage (the PV kernel loader takes both)
    assert status == 2 and err.count("\n") == 1 and "no bzImage setup header" in err


def test_missing_scenario_file(tmp_path, capsys):
    status, _, err = run_cli(["run", str(tmp_path / "nope.toml")], capsys)
    assert status == 2 and "no such scenario file" in err


def test_an_image_domain_takes_its_kind_from_the_image(tmp_path, capsys):
    images = SCENARIOS / "images"
    text = ('[machine]\nmemory = "64M"\n[[domain]]\nname = "x"\n'
            f'image = "{images / "pv-hello-100us.img.zst"}"\n')
    ok = write(tmp_path, text)
    assert load_scenario(ok).domains[0].type == "image"
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(text + 'type = "hvm"\n')
    status, _, err = run_cli(["run", str(wrong)], capsys)
    assert status == 2 and "holds a pv domain" in err


def test_linux_keys_parse_and_are_refused_where_they_mean_nothing(tmp_path, capsys):
    linux = GOOD.replace('vcpus = 2\n', 'vcpus = 1\ncmdline = "console=hvc0"\n'
                         'busybox = "bb/busybox"\n')
    (d,) = load_scenario(write(tmp_path, linux)).domains
    assert d.cmdline == "console=hvc0" and d.busybox == (tmp_path / "bb/busybox").resolve()
    hvm = linux.replace('vcpus = 1\n', 'vcpus = 1\ntype = "hvm"\n')
    with pytest.raises(ScenarioError, match="'cmdline' and 'busybox' are for PV kernels"):
        load_scenario(write(tmp_path, hvm))
    # a kernel without Xen notes (an HVM one) as PV with a command line: one line, status 2
    own = linux.replace('kernel = "k.elf"', f'kernel = "{SCENARIOS / "guests/hvm_crash.elf"}"')
    assert main(["run", str(write(tmp_path, own))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Xen ELF notes: not a PV kernel" in err
