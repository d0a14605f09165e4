"""State dataclasses to JSON-ready data and back (hypervisor/stream/plain.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.hvm.vcpu import HvmVcpuState, save_hvm_vcpu
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from hypervisor.stream.plain import from_plain, to_plain
from tests import SCENARIOS


@dataclasses.dataclass(frozen=True)
class Inner:
    name: str
    count: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    blob: bytes
    flag: bool = False
    maybe: int | None = None
    by_vector: dict[int, int] = dataclasses.field(default_factory=dict)
    pairs: tuple[tuple[str, int], ...] = ()
    inners: tuple[Inner, ...] = ()


outers = st.builds(
    Outer,
    blob=st.binary(max_size=64), flag=st.booleans(),
    maybe=st.none() | st.integers(0, 2**64 - 1),
    by_vector=st.dictionaries(st.integers(0, 255), st.integers(0, 2**32)),
    pairs=st.lists(st.tuples(st.text(max_size=8), st.integers(0, 99)), max_size=4,
                   unique_by=lambda p: p[0]).map(tuple),
    inners=st.lists(st.builds(Inner, st.text(max_size=8), st.integers(0, 9)), max_size=3)
    .map(tuple))


@given(outers)
def test_every_state_survives_json(value):
    assert from_plain(Outer, json.loads(json.dumps(to_plain(value)))) == value


def test_the_plain_form_is_readable_json():
    value = Outer(blob=b"\x01\xff", by_vector={48: 2}, pairs=(("acks", 3),),
                  inners=(Inner("nic", 1),))
    assert to_plain(value) == {"blob": "01ff", "flag": False, "maybe": None,
                               "by_vector": {"48": 2}, "pairs": {"acks": 3},
                               "inners": [{"name": "nic", "count": 1}]}


@pytest.mark.parametrize("data, message", [
    ({"blob": "00", "maybe": -1}, "Outer.maybe must be a non-negative integer"),
    ({"blob": "00", "flag": 1}, "Outer.flag must be true or false"),
    ({"blob": "00", "maybe": True}, "Outer.maybe must be a non-negative integer"),
    ({"flag": True}, "Outer: missing blob"),
    ({"blob": "zz"}, "non-hexadecimal"),
    ({"blob": "00", "by_vector": {"x": 1}}, "key 'x' must be a non-negative integer"),
    ({"blob": "00", "inners": [{"count": 1}]}, r"Outer.inners\[0\]: missing name"),
    ({"blob": "00", "inners": {"name": "a"}}, "Outer.inners must be a list"),
])
def test_a_damaged_record_is_one_error_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        from_plain(Outer, data)


def test_missing_fields_with_defaults_are_older_records_and_unknown_keys_newer_ones():
    assert from_plain(Outer, {"blob": "", "added_later": 1}) == Outer(blob=b"")


def test_an_hvm_vcpu_is_written_once_from_its_dataclass():
    """HVLAB_DOMAIN's per-vCPU keys are HvmVcpuState's fields: adding a field to the
    dataclass is all it takes for save, restore, the hand-over and the proof to carry it."""
    hv = boot_scenario(load_scenario(SCENARIOS / "hvm-lapic.toml"))
    try:
        hv.run(2_000_000)
        state = save_hvm_vcpu(hv.domains[0].vcpus[0])
        plain = json.loads(json.dumps(to_plain(state)))
        assert list(plain) == [f.name for f in dataclasses.fields(HvmVcpuState)]
        assert from_plain(HvmVcpuState, plain) == state
        assert state.lapic.now_ns > 0 and len(state.posted) == 64 and state.sources
    finally:
        hv.teardown()
