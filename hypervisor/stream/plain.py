"""State dataclasses as JSON-ready plain data and back: hvlab's own records (HVLAB_DOMAIN).

A state dataclass holds plain data only: non-negative ints (times, counts, addresses),
bools, strings, bytes, None, tuples, dicts and other state dataclasses. `to_plain` writes
one JSON object key per field: bytes as hex, dict keys as strings, a tuple of (key, value)
pairs as an object, tuples as lists. `from_plain` reads it back, checking every value
against the field's annotation, so a damaged record is one ValueError naming the field
and never a half-built object; a field missing where the dataclass has a default takes
it (older records), keys it does not know are ignored (newer ones). The field list is
the dataclass's: nothing else repeats it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar, get_args, get_origin

T = TypeVar("T")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_pairs(tp: Any) -> bool:
    """`tuple[tuple[K, V], ...]`: written as a JSON object."""
    args = get_args(tp)
    return (get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis
            and get_origin(args[0]) is tuple and len(get_args(args[0])) == 2)


def to_plain(value: Any, tp: Any = None) -> Any:
    """`value` (a state dataclass, or a field of one typed `tp`) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _hints(type(value))
        return {f.name: to_plain(getattr(value, f.name), hints[f.name])
                for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        key_tp, value_tp = get_args(tp) if tp is not None else (None, None)
        return {str(k): to_plain(v, value_tp) for k, v in value.items()}
    if isinstance(value, tuple):
        if tp is not None and _is_pairs(tp):
            _, value_tp = get_args(get_args(tp)[0])
            return {str(k): to_plain(v, value_tp) for k, v in value}
        item_tp = get_args(tp)[0] if tp is not None and get_args(tp) else None
        return [to_plain(v, item_tp) for v in value]
    return value


def from_plain(cls: type[T], data: Any, where: str = "") -> T:
    """The state dataclass `cls` from `to_plain`'s output; ValueError names what is wrong."""
    return _read(cls, data, where or cls.__name__)


def _read(tp: Any, data: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if data is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _read(inner, data, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object")
        hints = _hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        missing = [n for n in names if n not in data and _required(tp, n)]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        return tp(**{n: _read(hints[n], data[n], f"{where}.{n}") for n in names if n in data})
    if tp is bool:
        if not isinstance(data, bool):
            raise ValueError(f"{where} must be true or false, got {data!r}")
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool) or data < 0:
            raise ValueError(f"{where} must be a non-negative integer, got {data!r}")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise ValueError(f"{where} must be text, got {data!r}")
        return data
    if tp is bytes:
        if not isinstance(data, str):
            raise ValueError(f"{where} must be hex text")
        return bytes.fromhex(data)
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object")
        return {_key(key_tp, k, where): _read(value_tp, v, f"{where}[{k}]")
                for k, v in data.items()}
    if origin is tuple:
        if _is_pairs(tp):
            key_tp, value_tp = get_args(get_args(tp)[0])
            if not isinstance(data, dict):
                raise ValueError(f"{where} must be an object")
            return tuple((_key(key_tp, k, where), _read(value_tp, v, f"{where}[{k}]"))
                         for k, v in data.items())
        (item_tp, _) = get_args(tp)
        if not isinstance(data, list):
            raise ValueError(f"{where} must be a list")
        return tuple(_read(item_tp, v, f"{where}[{i}]") for i, v in enumerate(data))
    raise TypeError(f"{where}: no plain form for {tp!r}")


def _key(tp: Any, key: str, where: str) -> Any:
    if tp is int:
        if not key.isdigit():
            raise ValueError(f"{where}: key {key!r} must be a non-negative integer")
        return int(key)
    return key


def _required(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
