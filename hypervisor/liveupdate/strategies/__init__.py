"""How the new build rebuilds page-type references during a live update: the registry.

Every module of this package except `base` is one strategy and defines `STRATEGY`, an
instance of `base.Strategy`; the registry finds them by listing the package, so adding
a strategy is adding a module (and its test), nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from hypervisor.liveupdate.strategies.base import Strategy, StrategyError

# Listed in this order where a person reads them; strategies not named here follow.
_READING_ORDER = ("full-walk", "transfer", "lazy", "prevalidate")


@cache
def registry() -> dict[str, Strategy]:
    """Every strategy by name (the package is listed once)."""
    found: dict[str, Strategy] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        strategy = getattr(module, "STRATEGY", None)
        if not isinstance(strategy, Strategy) or not strategy.name:
            raise TypeError(f"{module.__name__} defines no named STRATEGY")
        if strategy.name in found:
            raise TypeError(f"two strategies are named {strategy.name!r}")
        found[strategy.name] = strategy
    rank = {name: i for i, name in enumerate(_READING_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def names() -> tuple[str, ...]:
    return tuple(registry())


def strategy(name: str) -> Strategy:
    """The strategy called `name`; StrategyError naming the choices if there is none."""
    try:
        return registry()[name]
    except KeyError:
        raise StrategyError(f"unknown strategy '{name}' (choose from "
                            f"{', '.join(names())})") from None
