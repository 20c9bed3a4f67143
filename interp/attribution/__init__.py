"""Localisation methods over shared sites: exact patching, attribution patching, LRP rules.

The front door is `attribute(model, pairs, method=...)` (`front.py`); the method functions,
metrics and result types are re-exported here. The methods import eagerly (none of them
imports `interp.tasks`). `attribute` and the slot helpers use `interp.tasks`, whose pairs
build their metric from `interp.attribution.metrics`, so they are imported on first use
(PEP 562) and `import interp.tasks` never meets a half-initialised package.

Two submodules share their function's name (`atp_star`, `relp`): here the names are the
functions; import the modules as `interp.attribution.atp_star` / `.relp` for anything else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from interp.attribution.atp import attribution_patching
from interp.attribution.atp_star import atp_star
from interp.attribution.ig import integrated_gradients
from interp.attribution.lrp import LRPRules, lrp_rules
from interp.attribution.metrics import (
    CallableMetric,
    KLToClean,
    LogitDiff,
    LogProb,
    LogSumExpDiff,
    Metric,
    MetricBase,
    MetricLike,
    Prob,
    RefusalScore,
    as_metric,
)
from interp.attribution.patching import exact_patching
from interp.attribution.relp import relp
from interp.attribution.sites import FAMILIES, Scores, SiteFamily

#: Names imported on first use -> the submodule that defines them.
_LAZY = {"attribute": "front", "METHODS": "front", "by_slot": "slots", "position_groups": "slots"}

__all__ = sorted([
    "attribution_patching", "atp_star", "integrated_gradients", "LRPRules", "lrp_rules",
    "CallableMetric", "KLToClean", "LogitDiff", "LogProb", "LogSumExpDiff", "Metric", "MetricBase",
    "MetricLike", "Prob", "RefusalScore", "as_metric", "exact_patching", "relp", "FAMILIES",
    "Scores", "SiteFamily", *_LAZY,
])

if TYPE_CHECKING:  # for static tools; at run time __getattr__ imports them on first use
    from interp.attribution.front import METHODS, attribute
    from interp.attribution.slots import by_slot, position_groups


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interp.attribution' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interp.attribution.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
