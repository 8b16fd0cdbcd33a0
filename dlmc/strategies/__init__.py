"""Decoding strategies: which of a step's predicted tokens to commit, as rules on [B, K] tensors.

`STRATEGIES` is a closed registry, name -> frozen config dataclass. A config builds the rule for one
decode (`config.build(llada_config)`); the rule owns the batch's state and commits with masks, sorts
and cumulative sums of static shape, so the same object runs in the fused loop of a compiled artifact
(`dlmc.runtime.loop`) and, row by row, in the reference LLaDA decoder (`dlmc.decoding.llada`).

Select one with `LLaDAConfig(strategy=ThresholdConfig(threshold=0.8))`, `strategy="eb"` or
`strategy={"name": "eb", "gamma": 0.1}`; `dlmc run --strategy eb --strategy-config '{"gamma": 0.1}'`;
a recipe's `decode: {decoder: llada, strategy: {name: eb, gamma: 0.1}}`. Without one, the LLaDA config's
own fields choose today's rule (`resolve`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dlmc.errors import DlmcError
from dlmc.strategies.base import (
    EXTRA_OUTPUTS, Scores, Strategy, StrategyConfig, entropy, logit_margin, top_ids, top_probs,
)
from dlmc.strategies.credit import CreditConfig
from dlmc.strategies.eb import EBConfig
from dlmc.strategies.factor import FactorConfig
from dlmc.strategies.hierarchical import HierarchicalConfig
from dlmc.strategies.klass import KLASSConfig
from dlmc.strategies.local_leap import LocalLeapConfig
from dlmc.strategies.prophet import ProphetConfig
from dlmc.strategies.sched import SchEDConfig
from dlmc.strategies.threshold import ThresholdConfig
from dlmc.strategies.top_k import TopKConfig

STRATEGIES: dict[str, type[StrategyConfig]] = {
    "top_k": TopKConfig,
    "threshold": ThresholdConfig,
    "factor": FactorConfig,
    "eb": EBConfig,
    "hierarchical": HierarchicalConfig,
    "local_leap": LocalLeapConfig,
    "prophet": ProphetConfig,
    "sched": SchEDConfig,
    "credit": CreditConfig,
    "klass": KLASSConfig,
}
"""Closed registry: strategy name -> its config class."""


def strategy_config(value: Any) -> StrategyConfig:
    """A strategy config from a config, a name, or a mapping {"name": ..., **fields} (JSON, a recipe)."""
    if isinstance(value, StrategyConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise DlmcError(f"strategy: expected a name or a mapping with a 'name', got {value!r}")
    fields = dict(value)
    name = fields.pop("name")
    if name not in STRATEGIES:
        raise DlmcError(f"strategy: unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")
    config_type = STRATEGIES[name]
    known = [f for f in dataclasses.fields(config_type) if f.init]
    unknown = sorted(set(fields) - {f.name for f in known})
    if unknown:
        names = ", ".join(f.name for f in known) or "none"
        raise DlmcError(f"strategy.{unknown[0]}: not an option of {name} (its options: {names})")
    try:
        return config_type(**fields)
    except TypeError as e:  # a value of the wrong kind that the config's checks do not name
        raise DlmcError(f"strategy: {name}: {e}") from None


def resolve(decode) -> StrategyConfig:
    """The strategy an LLaDA config decodes with: its own `strategy`, else the rule its fields choose."""
    if decode.strategy is not None:
        return decode.strategy
    if decode.threshold is not None:
        return ThresholdConfig(threshold=decode.threshold)
    if decode.factor is not None:
        return FactorConfig(factor=decode.factor)
    return TopKConfig()


def strategy_option(name: str | None, options: str | None) -> dict | None:
    """The command line's --strategy NAME and --strategy-config JSON as the {"name": ..., **options} an
    LLaDA config takes (None: no strategy given)."""
    if name is None:
        if options is not None:
            raise DlmcError("--strategy-config needs a --strategy to configure")
        return None
    try:
        fields = json.loads(options) if options is not None else {}
    except json.JSONDecodeError as e:
        raise DlmcError(f"--strategy-config is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise DlmcError(f"--strategy-config must be a JSON object of options, got {options}")
    return {"name": name, **fields}


__all__ = [
    "strategy_option",
    "EXTRA_OUTPUTS", "STRATEGIES", "Scores", "Strategy", "StrategyConfig", "CreditConfig", "EBConfig",
    "FactorConfig", "HierarchicalConfig", "KLASSConfig", "LocalLeapConfig", "ProphetConfig", "SchEDConfig",
    "ThresholdConfig", "TopKConfig", "entropy", "logit_margin", "resolve", "strategy_config", "top_ids", "top_probs",
]
