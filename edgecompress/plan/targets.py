"""Whole-model targets a plan is made for: ``params=4x`` (parameter compression), ``macs=4x`` (MAC reduction),
``latency=2x`` (speedup against dense, measured on a provider at batch 1: ``plan.timing``).

A target is a kind and a factor above 1, parsed from ``KIND=VALUE`` (``4`` and ``4x`` both accepted); the
budget it sets is the dense model's total divided by the factor.
"""

from __future__ import annotations

import re

from edgecompress.errors import ConfigError

KINDS = ("params", "macs", "latency")


def parse_target(text: str) -> tuple[str, float]:
    """``"params=4x"`` -> ``("params", 4.0)``; a one-line ConfigError for anything else."""
    kind, sep, value = str(text).partition("=")
    kind = kind.strip().lower()
    if not sep:
        raise ConfigError(f"--target {text!r}: expected KIND=VALUE, e.g. params=4x or macs=2")
    return check_target(kind, value)


def check_target(kind: str, value) -> tuple[str, float]:
    if kind not in KINDS:
        raise ConfigError(f"--target {kind}=...: unknown target kind {kind!r}; expected one of {', '.join(KINDS)}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX]?\s*", str(value))
    if match is None:
        raise ConfigError(f"--target {kind}={value}: the value must be a number, e.g. {kind}=4x")
    factor = float(match.group(1))
    if not factor > 1:
        raise ConfigError(f"--target {kind}={value}: the factor must be above 1 (it divides the dense model's {kind})")
    return kind, factor


def describe(targets) -> str:
    return ", ".join(f"{kind} {value:.3g}x" for kind, value in targets)


def error_summary(plan: dict) -> str:
    """``, output error 0.081 (bound 0.1)`` for a plan made under ``--max-error``; empty otherwise."""
    bound = plan.get("max_error")
    return "" if not bound else f", output error {bound['measured']:.3g} (bound {bound['bound']:g})"
