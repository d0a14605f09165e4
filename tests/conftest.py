"""Fixtures shared by several test groups."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hypervisor.images.domains import save_domain
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS


@pytest.fixture(scope="session")
def saved_image(tmp_path_factory) -> Callable[[str, int], Path]:
    """`saved_image(scenario, instructions)`: the image of the scenario's first domain saved
    after that many instructions; made once per session, so tests only read it."""
    made: dict[tuple[str, int], Path] = {}

    def save(scenario: str, instructions: int) -> Path:
        if (scenario, instructions) not in made:
            hv = boot_scenario(load_scenario(SCENARIOS / scenario))
            hv.run(instructions)
            path = tmp_path_factory.mktemp("saved") / f"{Path(scenario).stem}.img"
            save_domain(hv, hv.domains[0], path)
            made[scenario, instructions] = path
        return made[scenario, instructions]

    return save
