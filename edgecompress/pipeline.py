"""The main job in one call: ``run(model, out_dir, config) -> Report``.

Builds every variant (dense, each method x ratio, int8 of each), in stages over all variants:
factorize -> (fine-tune by distillation) -> export (onnxsim, parity) -> quantize -> bench (one
interleaved run of every ONNX file) -> evaluate on data -> report.json / report.md / report.html.
A variant that fails at any stage is recorded with its reason and the others go on; a stage whose
module is missing (int8, bench) fails the variants or the step with that reason, never the run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from edgecompress.models import DEFAULT_MODEL

from edgecompress import exporters, io, runtime
from edgecompress.data import RunData, default_data, load_data
from edgecompress.errors import ConfigError, EdgeCompressError
from edgecompress.export import ExportConfig, export_module
from edgecompress.loading import (
    InputSpec,
    LoadedModel,
    load_model,
    load_weights_,
    parse_shape,
    sample_inputs,
)
from edgecompress.report import Report, Variant, write_report
from edgecompress.user_eval import load_eval
from edgecompress.stats import count_macs, count_params

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("svd", "tucker", "cp", "tt")
STAGES = ("factorize", "finetune", "export", "quantize", "bench", "evaluate", "report")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """``methods`` None: every registered method of DEFAULT_METHODS; layers with fewer than
    ``min_params`` parameters stay dense (factorizing them saves nothing worth the error)."""

    methods: tuple[str, ...] | None = None
    ratios: tuple[float, ...] = (2.0, 4.0)
    int8: bool = True
    provider: str = "cpu"
    threads: tuple[int, ...] = (1, 2)
    finetune_epochs: int = 0
    finetune_lr: float = 2e-3  # with batch_size None and T=2: CREPE tiny tucker 2x 71% -> 99.25% in 3 epochs
    finetune_minutes: float | None = None  # a time budget per variant, besides the epochs
    distill_loss: str | None = None  # kl, bce or mse; None: from the model's output (finetune.output_kind)
    feature_weight: float = 0.1  # the per-layer feature term of the distillation (0: off; see finetune)
    batch_size: int | None = None  # fine-tuning batch; None: about 64 steps per epoch, 8 to 64 samples each
    bench_runs: int = 50
    bench_warmup: int = 3
    profile: bool = False
    rank_multiple: int = 8
    min_params: int = 4096
    min_outputs: int = 16  # classifier heads stay dense
    head_share: float = 0.05  # the output layer stays dense while it holds at most this share (FactorizeConfig)
    data_free: bool = False  # fit the factors to the weights alone even with data (the data then only measures)
    keep_faster: bool = False  # profile each chain against its dense layer; keep dense where not faster
    keep_faster_precision: str | None = None  # None: int8 when int8 variants are made, else fp32
    calib_samples: int = 64
    eval_samples: int | None = None
    seed: int = 0
    # one planned variant per target, ``auto-<kind><value>x``: each layer's method (among ``methods``) and
    # ratio chosen for that whole-model target (``edgecompress.plan``)
    targets: tuple[tuple[str, float], ...] = ()
    max_drop: float = 0.01  # the report recommends the fastest variant within this drop of dense quality
    max_error: float | None = None  # planned variants: a bound on the whole model's held-out output error
    # the user's task metric, FILE.py:FUNCTION (an ONNX path -> a score, higher is better; ``user_eval``)
    eval: str | None = None

    def __post_init__(self):
        if self.methods is not None and not self.methods:
            raise ConfigError("give at least one method, e.g. --methods svd,tucker")
        if not self.ratios and self.methods:
            raise ConfigError("give at least one --ratio")
        if any(not r > 1 for r in self.ratios):
            raise ConfigError(f"every ratio must be above 1 (parameter compression per layer), got {list(self.ratios)}")
        if not self.threads or any(int(t) != t or t < 1 for t in self.threads):
            raise ConfigError(f"threads must be positive integers such as 1,2, got {list(self.threads)}")
        if int(self.finetune_epochs) != self.finetune_epochs or self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be a whole number >= 0, got {self.finetune_epochs}")
        if self.finetune_minutes is not None and not self.finetune_minutes > 0:
            raise ConfigError(f"--finetune-minutes must be a positive time budget, got {self.finetune_minutes}")
        from edgecompress.finetune import LOSSES

        if self.distill_loss is not None and self.distill_loss not in LOSSES:
            raise ConfigError(f"unknown --distill-loss {self.distill_loss!r}: use one of {', '.join(LOSSES)}")
        for name in ("bench_runs", "batch_size", "calib_samples", "rank_multiple"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        from edgecompress.plan.targets import check_target

        if not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop must be a fraction in [0, 1) (0.01: one point), got {self.max_drop}")
        for kind, value in self.targets:
            check_target(kind, value)
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"eval samples must be at least 1, got {self.eval_samples}")
        if self.max_error is not None and not (self.max_error > 0 and self.targets):
            raise ConfigError("--max-error must be positive and bounds planned variants: keep a --target "
                              f"(got {self.max_error}{', no planned variant' if not self.targets else ''})")
        if self.min_params < 0:
            raise ConfigError(f"--min-params must be at least 0, got {self.min_params}")

    def latency_config(self):
        """How ``keep_faster`` times the layers: on the run's provider at its first thread count, as int8
        when the run makes int8 variants (the choice then suits the deployed int8 model; the fp32 variant
        of the same method shares it)."""
        from edgecompress.latency import LatencyConfig

        precision = self.keep_faster_precision or ("int8" if self.int8 else "fp32")
        return LatencyConfig(self.provider, self.threads[0], precision=precision)

    def method_list(self) -> list[str]:
        """The methods asked for; None means every default method that is registered here."""
        from edgecompress.factorize import methods

        if self.methods is None:
            return [m for m in DEFAULT_METHODS if m in methods()]
        return list(self.methods)

    def jobs(self) -> list[tuple[str, str, float | None, tuple]]:
        """(variant name, method, ratio, targets) of every factorized variant: methods x ratios, then the plans."""
        uniform = [(f"{m}-x{_fmt(r)}", m, r, ()) for m in self.method_list() for r in self.ratios]
        return uniform + [(f"auto-{kind}{_fmt(value)}x", "auto", None, ((kind, value),)) for kind, value in self.targets]


class Progress:
    """What ``run`` reports while it works; the CLI draws it. ``start`` once per stage, then ``advance``."""

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, detail: str = "") -> None:
        pass


def run(model: str | LoadedModel | nn.Module | None, out_dir: str | Path, config: RunConfig = RunConfig(),
        data: RunData | str | Path | None = None, weights: str | Path | None = None,
        input_shape: str | tuple[int, ...] | None = None, input_dtype: str | None = None,
        progress: Progress | None = None, calib: str | Path | None = None) -> Report:
    """Run the whole pipeline on ``model`` (a zoo name, a factory path, a LoadedModel, or an nn.Module
    with ``input_shape``; None: the bundled digits model with its held-out set) and write the report
    files into ``out_dir``. ``data`` is a RunData or an .npz path (see ``edgecompress.data``). ``calib``
    (an .npz or a folder, as ``export --calib`` reads it) is what the factors are fitted to and int8 is
    calibrated on, instead of the data's train part. Bad input fails before any work and leaves no output
    folder behind that was not there before."""
    with io.new_folder(out_dir):
        return _run(model, out_dir, config, data, weights, input_shape, input_dtype, progress, calib)


def _run(model, out_dir, config, data, weights, input_shape, input_dtype, progress, calib) -> Report:
    progress = progress or Progress()
    start = time.perf_counter()
    runtime.resolve_provider(config.provider)  # an unknown or missing provider fails before any work
    if config.eval:
        load_eval(config.eval)  # a wrong path or name fails before any work too
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        if weights is not None or input_dtype is not None:
            raise ConfigError("--weights and --input-dtype cannot be used with an ONNX file as MODEL")
        return _run_onnx(Path(model), Path(out_dir), config, data, progress, start, input_shape, calib)
    loaded = _loaded(model, weights, input_shape, input_dtype)
    out_dir = Path(out_dir)
    io.ensure_writable(out_dir / "report.json")
    if data is None:
        data = default_data(loaded.name)
    elif not isinstance(data, RunData):
        data = load_data(data, loaded.input_spec)
    dense = copy.deepcopy(loaded.module).eval()  # folding BatchNorm must not change the caller's model
    exporters.fold_batchnorm_(dense)
    samples = sample_inputs(dense, loaded.input_spec, 2, config.seed)
    settings = {**dataclasses.asdict(config), "methods": config.method_list()}
    report = Report(model=loaded.name, input_shape=list(loaded.input_spec.shape), config=settings,
                    data=data.describe() if data else {"source": "random samples", "labels": False})
    calib_set = _factorize_calibration(loaded, data, config, "input", calib)
    _note_calibration(report, calib_set, config)
    _note_random_evaluation(report, data)
    modules = _build(dense, loaded, config, samples, report, progress, calib_set)
    if config.finetune_epochs:
        _finetune(modules, dense, data, config, report, progress, loaded)
    _export(modules, loaded, out_dir, samples, report, progress)
    if config.int8:
        _quantize(_as_array(calib_set) if calib is not None else _calibration(loaded, data, config), out_dir, config,
                  report, progress)
    _bench(report, config, progress)
    _evaluate(report, *_eval_inputs(loaded, data, config), config, progress)
    return _finish(report, out_dir, start, progress)


def _factorize_calibration(loaded: LoadedModel | None, data: RunData | None, config: RunConfig, name: str,
                           path: str | Path | None = None, proto=None):
    """The samples the factors are fitted to: ``path`` (``--calib``, checked against the model's input: the
    PyTorch ``loaded``, else the ONNX ``proto``), else the data's train part (``calib_samples``, and an eighth
    more held out for the per-layer errors), else the zoo entry's own data; None without any."""
    from edgecompress.capture.samples import calibration_set, onnx_calibration, torch_calibration

    if path is not None:
        if loaded is not None:
            return torch_calibration(loaded, path, config.calib_samples)
        return onnx_calibration(proto, path, config.calib_samples)
    if data is not None:
        x, _ = data.train()
        return calibration_set({name: x[: config.calib_samples + config.calib_samples // 7].numpy()},
                               f"{data.source} (train part)" if not data.train_is_eval else data.source)
    return torch_calibration(loaded, None, config.calib_samples, config.seed) if loaded is not None else None


def _note_random_evaluation(report: Report, data: RunData | None) -> None:
    """Without data, the report says what its agreement figures are worth."""
    if data is None:
        report.notes.append("no --data: agreement and SQNR are measured on seeded random inputs, which a model "
                            "trained on real data may treat unlike its data (Magika: 1.6% agreement on random bytes "
                            "for a variant at 99.7% on real files); give --data FILE.npz for figures that mean it")


def _note_calibration(report: Report, calib, config: RunConfig) -> None:
    if calib is None:
        report.notes.append("no calibration data: the factors are fitted to the weights alone, which costs trained "
                            "models far more accuracy; give --data")
    elif config.data_free:
        report.notes.append("--data-free: the factors are fitted to the weights alone; the data only measures them")
    else:
        report.notes.append(f"factors fitted to {calib.fit_count} calibration samples from {calib.source}; "
                            f"per-layer output errors on {calib.held_count} held out")


def _finish(report: Report, out_dir: Path, start: float, progress: Progress) -> Report:
    report.seconds = round(time.perf_counter() - start, 2)
    progress.start("report", 1)
    write_report(report, out_dir)
    progress.advance("report", "report.json, report.md, report.html")
    return report


def _run_onnx(path: Path, out_dir: Path, config: RunConfig, data, progress: Progress, start: float,
              input_shape: str | None = None, calib: str | Path | None = None) -> Report:
    """``run`` on an ONNX file: the variants come from ``edgecompress.graph`` (svd, svd-spatial,
    tucker, cp, tt); int8, bench, evaluation and the report are the same. ``input_shape`` fixes dynamic dims
    (``--input-shape``). No fine-tuning: it needs PyTorch."""
    from edgecompress.calibration import random_samples
    from edgecompress.graph import METHODS, factorize_onnx
    from edgecompress.graph.shapes import fixed, parse_input_shapes
    from edgecompress.quantize import ZOO_METADATA_KEY

    proto = runtime.load_onnx(path)
    io.ensure_writable(out_dir / "report.json")
    shaped = fixed(proto, parse_input_shapes(input_shape, proto)) if input_shape else proto
    spec = _onnx_spec(shaped)
    zoo = next((p.value for p in proto.metadata_props if p.key == ZOO_METADATA_KEY), None)
    if data is None:
        data = default_data(zoo) if zoo else None
    elif not isinstance(data, RunData):
        data = load_data(data, spec)
    settings = {**dataclasses.asdict(config), "methods": config.method_list()}
    report = Report(model=path.name, input_shape=list(spec.shape), config=settings,
                    data=data.describe() if data else {"source": "random samples", "labels": False})
    if config.finetune_epochs:
        report.notes.append("fine-tuning skipped: it trains the PyTorch model, and MODEL is an ONNX file")
    calib_set = _factorize_calibration(None, data, config, _onnx_input_name(proto), calib, proto)
    _note_calibration(report, calib_set, config)
    _note_random_evaluation(report, data)
    dense_params = exporters.param_count(proto)
    jobs = config.jobs()
    judge = _plan_judge(config) if config.eval and any(targets for *_, targets in jobs) else None
    progress.start("factorize", len(jobs) + 1)
    progress.advance("factorize", "dense")
    report.variants.append(_write_variant(Variant(name="dense", method="dense", params=dense_params, compression=1.0),
                                          proto, out_dir))
    for name, method, ratio, targets in jobs:
        variant = Variant(name=name, method=method, ratio=ratio)
        report.variants.append(variant)
        progress.advance("factorize", variant.name)
        if method not in (*METHODS, "auto"):
            _fail(variant, "factorize", f"{method} cannot factorize an ONNX file: use one of {', '.join(METHODS)}, "
                                        "or run on the PyTorch model")
            continue
        t0 = time.perf_counter()
        try:
            new, frep = factorize_onnx(proto, _fconfig(config, method, ratio, targets), calib=calib_set,
                                       latency_config=config.latency_config() if config.keep_faster else None,
                                       input_shapes=input_shape, judge=judge if targets else None)
            new, _ = exporters.simplify(new)
            exporters.check_model(new)
        except Exception as exc:  # one variant's failure must not stop the others
            _fail(variant, "factorize", exc)
            continue
        if not _record_layers(variant, frep):
            continue
        variant.params = exporters.param_count(new)
        variant.compression = round(dense_params / variant.params, 4)
        variant.seconds["factorize"] = round(time.perf_counter() - t0, 3)
        _write_variant(variant, new, out_dir)
    if data is not None:
        train, (x, labels) = data.train()[0], data.eval(config.eval_samples)
    else:  # seeded random inputs: the first calib_samples + 8 calibrate, the last 64 evaluate
        samples = random_samples(shaped, config.calib_samples + 8 + 64, config.seed + 1)
        train = torch.from_numpy(np.concatenate([next(iter(s.values())) for s in samples]))
        x, labels = train[-64:], None
    if config.int8:
        _quantize(_as_array(calib_set) if calib is not None else train[: config.calib_samples + 8].numpy(), out_dir,
                  config, report, progress)
    _bench(report, config, progress, input_shape)
    _evaluate(report, x, labels, config, progress)
    return _finish(report, out_dir, start, progress)


def _record_layers(variant: Variant, frep) -> bool:
    """Put the per-layer records on ``variant``; fail it, with every reason given, when nothing was factorized."""
    variant.layers = [r.to_dict() for r in frep.layers]
    if frep.plan is not None:
        variant.plan = {k: v for k, v in frep.plan.items() if k != "layers"}
    if not frep.factorized:
        reasons = sorted({r.reason for r in frep.layers if r.reason}) or ["no layer of a type it handles"]
        _fail(variant, "factorize", f"method {variant.method!r} factorized no layer: {'; '.join(reasons)}")
    return bool(frep.factorized)


def _onnx_input_name(proto: onnx.ModelProto) -> str:
    from edgecompress.calibration import model_inputs

    return model_inputs(proto)[0].name


def _onnx_spec(proto: onnx.ModelProto) -> InputSpec:
    """The first graph input's shape (unknown dimensions as 1) and dtype."""
    from edgecompress.calibration import model_inputs

    inputs = model_inputs(proto)
    if len(inputs) != 1:
        raise ConfigError(f"run takes a model with one input; this ONNX file has {len(inputs)}")
    info = inputs[0]
    return InputSpec(tuple(d or 1 for d in info.shape), "int64" if info.dtype.kind in "iu" else "float32")


def _write_variant(variant: Variant, proto: onnx.ModelProto, out_dir: Path) -> Variant:
    path = out_dir / f"{variant.name}.onnx"
    data = proto.SerializeToString()
    io.write_bytes(path, data)
    variant.onnx, variant.size_bytes, variant.op_counts = str(path), len(data), exporters.op_counts(proto)
    return variant


def _loaded(model, weights, input_shape, input_dtype) -> LoadedModel:
    """A LoadedModel from a name/factory path (None: the default), a LoadedModel, or an nn.Module."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ConfigError("an nn.Module needs input_shape, e.g. run(model, out, input_shape=(1, 3, 32, 32))")
        shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
        if weights is not None:
            load_weights_(model, weights)
        return LoadedModel(type(model).__name__, model.eval(), InputSpec(shape, input_dtype or "float32"))
    return load_model(model or DEFAULT_MODEL, weights, input_shape, input_dtype)


def _fconfig(config: RunConfig, method: str, ratio: float | None, targets: tuple = ()):
    from edgecompress.factorize import FactorizeConfig

    if targets:  # a planned variant: the methods asked for, else the planner's own default
        listed = tuple(config.methods or ())
        timing = config.latency_config()  # a latency target: timed where keep-faster times (provider, threads, int8)
        return FactorizeConfig(method=listed[0] if listed else "svd", targets=targets, methods=listed,
                               rank_multiple=config.rank_multiple, min_params=config.min_params,
                               min_outputs=config.min_outputs, head_share=config.head_share, data_free=config.data_free,
                               max_error=config.max_error, provider=timing.provider, threads=timing.threads,
                               precision=timing.precision)
    return FactorizeConfig(method=method, ratio=ratio, rank_multiple=config.rank_multiple, min_params=config.min_params,
                           min_outputs=config.min_outputs, head_share=config.head_share, data_free=config.data_free)


def _build(dense: nn.Module, loaded: LoadedModel, config: RunConfig, samples, report: Report,
           progress: Progress, calib=None) -> dict[str, nn.Module]:
    """The dense variant and one factorized module per method x ratio (failures recorded)."""
    from edgecompress.factorize import factorize

    dense_params, dense_macs = count_params(dense), count_macs(dense, samples[:1])[0]
    report.variants.append(Variant(name="dense", method="dense", params=dense_params, macs=dense_macs, compression=1.0))
    modules = {"dense": dense}
    jobs = config.jobs()
    judge = _plan_judge(config) if config.eval and any(targets for *_, targets in jobs) else None
    progress.start("factorize", len(jobs))
    for name, method, ratio, targets in jobs:
        variant = Variant(name=name, method=method, ratio=ratio)
        report.variants.append(variant)
        progress.advance("factorize", variant.name)
        t0 = time.perf_counter()
        try:
            module, frep = factorize(dense, _fconfig(config, method, ratio, targets), samples[:1], calib=calib,
                                     judge=judge if targets else None)
        except Exception as exc:  # one variant's failure must not stop the others
            _fail(variant, "factorize", exc)
            continue
        if not _record_layers(variant, frep):
            continue
        if config.keep_faster:
            from edgecompress.latency import keep_faster_

            latency = config.latency_config()
            try:
                keep_faster_(module, dense, frep, samples[:1], latency)
            except Exception as exc:
                _fail(variant, "keep-faster", exc)
                continue
            variant.layers = [r.to_dict() for r in frep.layers]
            if not frep.factorized:
                _fail(variant, "keep-faster", f"no chain ran faster than its dense layer ({latency.provider}, "
                                              f"{latency.threads} thread(s), {latency.precision}): the variant "
                                              "would be the dense model")
                continue
        variant.params, variant.macs = count_params(module), count_macs(module, samples[:1])[0]
        variant.compression = round(dense_params / variant.params, 4)
        variant.seconds["factorize"] = round(time.perf_counter() - t0, 3)
        modules[variant.name] = module
    return modules


def _finetune(modules: dict[str, nn.Module], dense: nn.Module, data: RunData | None, config: RunConfig,
              report: Report, progress: Progress, loaded: LoadedModel) -> None:
    from edgecompress.finetune import FinetuneConfig, distill_, tensor_loader

    names = [n for n in modules if n != "dense"]
    progress.start("finetune", len(names) * config.finetune_epochs)
    if data is None:
        report.notes.append("fine-tuning skipped: it needs --data (inputs, and labels if you have them)")
        return
    x, y = data.train()
    ft = FinetuneConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                        loss=config.distill_loss, feature_weight=config.feature_weight, minutes=config.finetune_minutes)
    if data.train_is_eval:
        report.notes.append("fine-tuned on the evaluation data itself (the data file has no train_ split): "
                            "the figures are measured on the training samples")
    x, y, held = _hold_out_for_epochs(x, y)
    if config.distill_loss:  # a loss that cannot apply to the output stops the run, before any training
        from edgecompress.finetune import check_loss

        with torch.no_grad():
            check_loss(config.distill_loss, dense.eval()(x[:8]))
    for name in names:
        variant = report.variant(name)
        batch = config.batch_size or min(64, max(8, len(x) // 64))  # small data: more, smaller steps
        loader = tensor_loader(x, y, batch, config.seed)
        try:
            history = distill_(modules[name], dense, loader, ft,
                               lambda epoch, loss, n=name: progress.advance("finetune", f"{n} epoch {epoch}: loss {loss:.4f}"),
                               held_out=held, evaluate=_user_scorer(config, loaded))
        except Exception as exc:
            _fail(variant, "finetune", exc)
            del modules[name]
            continue
        if config.eval:
            history["scored_by"] = config.eval
        variant.finetune = history
        variant.seconds["finetune"] = history["seconds"]


def _plan_judge(config: RunConfig):
    """With ``--eval``: the user's metric bounds each planned variant, at the dense model's score less
    ``--max-drop`` (in the metric's units), measured on the whole model (``plan.ScoreBound``)."""
    from edgecompress.plan import ScoreBound

    return ScoreBound(load_eval(config.eval), config.max_drop, f"{config.eval.rpartition(':')[2]} (--eval)")


def _user_scorer(config: RunConfig, loaded: LoadedModel):
    """With ``--eval``: a student's score by the user's function, on the student written to a temporary ONNX
    file (what each fine-tuning epoch is then judged by); else None (the held-out agreement or loss)."""
    if not config.eval:
        return None
    user_eval = load_eval(config.eval)

    def score(student: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="edgecompress-epoch-") as tmp:
            path = Path(tmp) / "student.onnx"
            export_module(student.eval(), loaded.input_spec, path)
            return user_eval(path)

    return score


def _hold_out_for_epochs(x: torch.Tensor, y: torch.Tensor | None):
    """The last eighth of the fine-tuning samples (at least 8, when there are 64 or more) scores each epoch;
    the rest trains. Fewer: every epoch is scored on the training samples."""
    held = len(x) // 8 if len(x) >= 64 else 0
    if not held:
        return x, y, x
    return x[:-held], (None if y is None else y[:-held]), x[-held:]


def _export(modules: dict[str, nn.Module], loaded: LoadedModel, out_dir: Path, samples, report: Report,
            progress: Progress) -> None:
    progress.start("export", len(modules))
    parity_samples = [[x] for x in samples]
    for name, module in modules.items():
        variant = report.variant(name)
        progress.advance("export", name)
        t0 = time.perf_counter()
        try:
            result = export_module(module, loaded.input_spec, out_dir / f"{name}.onnx", ExportConfig(), parity_samples)
        except Exception as exc:
            _fail(variant, "export", exc)
            continue
        variant.onnx = result["onnx"]["path"]
        variant.size_bytes = result["onnx"]["bytes"]
        variant.op_counts = result["onnx"]["op_counts"]
        variant.seconds["export"] = round(time.perf_counter() - t0, 3)


def _quantize(calib: np.ndarray, out_dir: Path, config: RunConfig, report: Report, progress: Progress) -> None:
    """An int8 variant of every fp32 variant, calibrated on ``calib``; each fails alone, with the reason."""
    parents = [v for v in report.variants if not v.int8]
    progress.start("quantize", len(parents))
    for parent in list(parents):
        variant = Variant(name=f"{parent.name}-int8", method=parent.method, ratio=parent.ratio, int8=True,
                          params=parent.params, macs=parent.macs, compression=parent.compression, layers=parent.layers)
        report.variants.insert(report.variants.index(parent) + 1, variant)
        progress.advance("quantize", variant.name)
        if parent.status != "ok":
            variant.status, variant.failed_at = "failed", parent.failed_at
            variant.error = f"its fp32 variant {parent.name!r} failed"
            continue
        t0 = time.perf_counter()
        try:
            result = quantize_int8(parent.onnx, out_dir / f"{variant.name}.onnx", calib, config.provider)
        except Exception as exc:
            _fail(variant, "quantize", exc)
            continue
        variant.onnx = str(out_dir / f"{variant.name}.onnx")
        variant.size_bytes = Path(variant.onnx).stat().st_size
        variant.quantize = result
        variant.seconds["quantize"] = round(time.perf_counter() - t0, 3)
        report.notes.extend(f"{variant.name}: {warning}" for warning in result["warnings"])


def _as_array(calib) -> np.ndarray:
    """A one-input CalibrationSet's samples, fitted and held out, as one array (what ``_quantize`` takes)."""
    return np.concatenate([next(iter(batch.values())) for batch in calib.fit + calib.held])


def _calibration(loaded: LoadedModel, data: RunData | None, config: RunConfig) -> np.ndarray:
    """Calibration inputs: from the fine-tuning/train part of the data, else seeded samples."""
    if data is not None:
        x, _ = data.train()
        return x[: config.calib_samples + 8].numpy()  # quantize holds the last 8 out for its own check
    batch = sample_inputs(loaded.module, loaded.input_spec, config.calib_samples + 8, config.seed + 1)
    return torch.cat(batch).numpy()


def _bench(report: Report, config: RunConfig, progress: Progress, input_shape: str | None = None) -> None:
    """Every ONNX file in one interleaved bench run; a failure fails only the bench step."""
    ready = [v for v in report.variants if v.status == "ok" and v.onnx]
    progress.start("bench", len(ready) * config.bench_runs * len(config.threads))
    if not ready:
        return
    try:
        from edgecompress.bench import BenchConfig, bench

        bconfig = BenchConfig(provider=config.provider, threads=tuple(config.threads), warmup=config.bench_warmup,
                              runs=config.bench_runs, memory=False, profile=config.profile, seed=config.seed,
                              input_shape=input_shape)
        done = [0]

        def tick(stage: str, count: int, total: int) -> None:
            if stage == "timing":
                while done[0] < count * len(ready) * len(config.threads):
                    done[0] += 1
                    progress.advance("bench", f"round {count}/{total}")

        results = bench([v.onnx for v in ready], bconfig, tick)
    except Exception as exc:
        report.steps["bench"] = {"status": "failed", "error": _reason(exc)}
        log.warning("bench failed: %s", _reason(exc))
        return
    report.steps["bench"] = {"status": "ok", "environment": results.get("environment")}
    by_path = {}
    for r in results["results"]:
        by_path.setdefault(r["model"], []).append(r)
    for variant in ready:
        rows = by_path.get(variant.onnx, [])
        variant.latency_ms = {str(r["threads"]): {"p50": r["latency_ms"]["p50"], "p90": r["latency_ms"]["p90"]} for r in rows}
        profiled = next((r["profile"] for r in rows if "profile" in r), None)
        if profiled:
            variant.layer_ms = profiled.get("layers_ms")
    _speedups(report, config)


def _speedups(report: Report, config: RunConfig) -> None:
    dense = report.variant("dense")
    for variant in report.variants:
        if not variant.latency_ms or not dense.latency_ms:
            continue
        ratios = {t: round(dense.latency_ms[t]["p50"] / lat["p50"], 4)
                  for t, lat in variant.latency_ms.items() if t in dense.latency_ms and lat["p50"]}
        variant.speedup_by_threads = ratios
        variant.speedup = ratios.get(str(config.threads[0]))


def _eval_inputs(loaded: LoadedModel, data: RunData | None, config: RunConfig):
    """(inputs, labels or None): the data's evaluation part, else 64 seeded samples."""
    if data is not None:
        return data.eval(config.eval_samples)
    return torch.cat(sample_inputs(loaded.module, loaded.input_spec, 64, config.seed + 2)), None


def _evaluate(report: Report, x: torch.Tensor, labels: torch.Tensor | None, config: RunConfig,
              progress: Progress) -> None:
    """Outputs of every ONNX file on ``x``: accuracy (with labels), agreement and SQNR vs dense; with ``--eval``
    the user's score of each file too."""
    from edgecompress.bench import agreement
    from edgecompress.data import run_onnx

    ready = [v for v in report.variants if v.status == "ok" and v.onnx]
    user_eval = load_eval(config.eval) if config.eval else None
    progress.start("evaluate", len(ready))
    reference = None
    for variant in ready:  # dense comes first
        progress.advance("evaluate", variant.name)
        try:
            out = run_onnx(variant.onnx, x.numpy(), config.provider)
        except Exception as exc:
            _fail(variant, "evaluate", exc)
            continue
        if variant.name == "dense":
            reference = out
        if reference is None:
            continue
        metrics = agreement(out, reference, labels.numpy() if labels is not None else None)
        variant.accuracy = metrics.get("accuracy")
        variant.agreement = metrics.get("top1_agreement")
        variant.sqnr_db = metrics["sqnr_db"] if variant.name != "dense" else None
        variant.max_abs_diff = metrics["max_abs_diff"]
        if user_eval is not None:
            try:
                variant.score = user_eval(variant.onnx)
            except ConfigError as exc:
                _fail(variant, "evaluate", exc)


def _fail(variant: Variant, stage: str, exc: Exception | str) -> None:
    variant.status, variant.failed_at = "failed", stage
    variant.error = f"{stage}: {exc if isinstance(exc, str) else _reason(exc)}"
    log.info("%s failed at %s: %s", variant.name, stage, variant.error)
    if not isinstance(exc, (str, EdgeCompressError)):
        log.debug("traceback of %s", variant.name, exc_info=exc)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, EdgeCompressError) else f"{type(exc).__name__}: {first}"


def _fmt(ratio: float) -> str:
    return f"{ratio:g}"



def quantize_int8(in_path: str | Path, out_path: str | Path, calib: np.ndarray, provider: str = "cpu",
                  eval_samples: int = 8) -> dict:
    """``edgecompress.quantize`` with the target's default mode (CPU: static QDQ for conv nets, dynamic
    for Linear-only models) calibrated on ``calib`` (its last ``eval_samples`` rows are held out for
    quantize's own SQNR check)."""
    import tempfile

    import onnx

    from edgecompress.quantize import QuantizeConfig, quantize, target_for

    model = onnx.load(str(in_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    name = next(i.name for i in model.graph.input if i.name not in initializers)
    target = target_for(provider)
    with tempfile.TemporaryDirectory(prefix="edgecompress-run-") as tmp:
        calib_file = Path(tmp) / "calib.npz"
        np.savez(calib_file, **{name: calib})
        config = QuantizeConfig(calib=str(calib_file), calib_samples=max(1, len(calib) - eval_samples),
                                eval_samples=eval_samples, target=target, compare_balance=False,
                                check_speed=False)  # the bench times every variant, interleaved
        return quantize(in_path, out_path, config)
