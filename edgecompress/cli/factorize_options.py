"""Factorization options shared by ``export``, ``plan`` and ``run``."""

from __future__ import annotations

import functools

import click

from edgecompress.errors import ConfigError


def factorize_options(func):
    """--method, --rank/--ratio/--energy, --rank-multiple, --min-params, --include/--exclude, --config."""

    @click.option("--method", default=None, metavar="METHOD",
                  help="Factorization method: svd, svd-spatial, tucker, cp, tt, tt-naive. Default: none (dense export).")
    @click.option("--rank", type=int, default=None, help="Rank (the largest TT-rank for tt) for every layer.")
    @click.option("--ratio", type=float, default=None, help="Parameter compression per layer, above 1 (default 2).")
    @click.option("--energy", type=float, default=None, help="Fraction of singular-value energy kept per mode, in (0, 1].")
    @click.option("--rank-multiple", type=int, default=None, help="Round ranks to a multiple of this (default 8).")
    @click.option("--min-params", type=int, default=None,
                  help="Keep layers with fewer parameters dense (listed with the reason). Default 0.")
    @click.option("--include", multiple=True, metavar="PATTERN", help="Only layers whose path matches (repeatable).")
    @click.option("--exclude", multiple=True, metavar="PATTERN", help="Skip layers whose path matches (repeatable).")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                  help="JSON/TOML file with defaults and per-layer overrides.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def factorize_config_from(method, rank, ratio, energy, rank_multiple, min_params, include, exclude, config_file):
    """A FactorizeConfig from the options, or None when nothing asks for factorization."""
    from edgecompress.factorize import FactorizeConfig, read_config_file

    fields = read_config_file(config_file) if config_file else {}
    if method is None and "method" not in fields:
        if any(v is not None for v in (rank, ratio, energy, min_params)) or include or exclude:
            raise ConfigError("--rank/--ratio/--energy/--min-params/--include/--exclude need --method (svd, tucker, cp, tt, ...)")
        return None
    if sum(v is not None for v in (rank, ratio, energy)):
        fields.update(rank=None, ratio=None, energy=None)
    explicit = {"method": method, "rank": rank, "ratio": ratio, "energy": energy, "rank_multiple": rank_multiple,
                "min_params": min_params}
    fields.update({k: v for k, v in explicit.items() if v is not None})
    if include:
        fields["include"] = tuple(include)
    if exclude:
        fields["exclude"] = tuple(exclude)
    return FactorizeConfig(**fields)


def latency_options(func):
    """--keep-faster, --min-speedup, --precision, --provider, --threads: keep a layer dense where its chain is not faster."""

    @click.option("--keep-faster", is_flag=True,
                  help="Time every factorized layer against its dense layer (profiled, on --provider at --threads) "
                       "and keep it dense where the chain is not faster.")
    @click.option("--min-speedup", type=float, default=None,
                  help="With --keep-faster: the speedup a chain must show to be kept (default 1.0).")
    @click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
                  help="With --keep-faster: time the layers as fp32, or as the int8 model `quantize` will make "
                       "(int8 kernels favour other shapes).")
    @click.option("--provider", default="cpu", show_default=True, help="With --keep-faster: where layers are timed.")
    @click.option("--threads", type=int, default=1, show_default=True, help="With --keep-faster: intra-op threads.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def latency_config_from(keep_faster, min_speedup, precision, provider, threads):
    """A LatencyConfig when --keep-faster (or --min-speedup) is given, else None."""
    from edgecompress.latency import LatencyConfig

    if not keep_faster and min_speedup is None:
        unused = [flag for flag, changed in (("--precision", precision != "fp32"), ("--provider", provider != "cpu"),
                                             ("--threads", threads != 1)) if changed]
        if unused:
            raise ConfigError(f"{'/'.join(unused)}: only used by --keep-faster (how it times the layers); add --keep-faster")
        return None
    return LatencyConfig(provider=provider, threads=threads, min_speedup=1.0 if min_speedup is None else min_speedup,
                         precision=precision)
