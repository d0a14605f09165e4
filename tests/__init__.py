"""hvlab's tests, grouped like the packages they test (tests/core/ tests hypervisor/core/, ...).

Paths every group uses are here; fixtures shared across groups are in conftest.py.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
GUESTS = SCENARIOS / "guests"
