"""`hvlab bench emulator`: the bare-unicorn side runs exactly the loop, however it ends."""

from __future__ import annotations

import pytest

from hypervisor.bench import emulator as bench
from hypervisor.scenario import load_scenario

# pv_spin.s: three set-up instructions, then 50,000,000 rounds of four.
LOOP_INSTRUCTIONS = 3 + 4 * 50_000_000


@pytest.mark.slow
def test_bare_loop_runs_the_same_instructions_with_and_without_an_exit_list() -> None:
    scenario = load_scenario(bench.SCENARIOS / "pv-spin.toml")
    kernel = scenario.domains[0].kernel
    assert kernel is not None
    by_hlt = bench._bare_unicorn(kernel, scenario.quantum_ns)
    by_exit = bench._bare_unicorn(kernel, scenario.quantum_ns, exit_list=True)
    assert by_hlt.count == by_exit.count == LOOP_INSTRUCTIONS
