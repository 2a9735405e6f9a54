"""``FactorizeConfig``: which method, which ranks, which layers; validated on construction.

Per-layer overrides come from a JSON or TOML file::

    {"method": "tucker", "ratio": 4, "rank_multiple": 8,
     "layers": {"layer4.*": {"ratio": 8}, "conv1": {"method": "dense"}, "fc": {"rank": 64}}}

Top-level keys are the defaults (CLI options given explicitly win over them); ``layers`` maps
fnmatch patterns on module paths to settings, the last matching pattern winning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import tomllib
from pathlib import Path
from typing import Any

from edgecompress.errors import ConfigError, LoadError
from edgecompress.factorize.ranks import RankSpec

_LAYER_KEYS = {"method", "rank", "ratio", "energy", "rank_multiple"}


@dataclasses.dataclass(frozen=True)
class FactorizeConfig:
    method: str = "svd"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    rank_multiple: int = 8
    min_params: int = 0  # layers with fewer parameters stay dense (recorded with the reason)
    min_outputs: int = 0  # layers with fewer outputs (a classifier head) stay dense unless an override names them
    # the output layer (the last candidate in forward order: no later layer corrects its errors) stays dense
    # when it holds at most this share of the candidates' parameters, unless named (0: factorized like any)
    head_share: float = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()
    # with calibration data: fit the factors to the data (False), or to the weights alone (True)
    data_free: bool = False
    damping: float = 0.01  # of the mean input variance, added to the covariances (few samples, dead channels)
    max_layer_error: float | None = None  # a layer whose held-out output error is above this stays dense
    # whole-model targets, ((kind, factor), ...) e.g. (("params", 4.0),): each layer's method and ratio are
    # then planned (``edgecompress.plan``) among ``methods`` (default svd, svd-spatial, tucker)
    targets: tuple[tuple[str, float], ...] = ()
    methods: tuple[str, ...] = ()
    max_error: float | None = None  # with targets: a bound on the whole model's held-out output error (relative)
    # where a latency target is measured: onnxruntime provider, intra-op threads, fp32 or int8 kernels
    provider: str = "cpu"
    threads: int = 1
    precision: str = "fp32"

    def __post_init__(self):
        from edgecompress.factorize.registry import check_method

        check_method(self.method)
        if int(self.min_params) != self.min_params or self.min_params < 0:
            raise ConfigError(f"min params must be a whole number >= 0, got {self.min_params}")
        if int(self.min_outputs) != self.min_outputs or self.min_outputs < 0:
            raise ConfigError(f"min outputs must be a whole number >= 0, got {self.min_outputs}")
        self.rank_spec()  # validates rank / ratio / energy / multiple
        if not 0 <= self.head_share <= 1:
            raise ConfigError(f"head share must be in [0, 1] (a share of the layers' parameters), got {self.head_share}")
        if not 0 <= self.damping:
            raise ConfigError(f"damping must be >= 0 (a fraction of the mean input variance), got {self.damping}")
        if self.max_layer_error is not None and not self.max_layer_error > 0:
            raise ConfigError(f"--max-layer-error must be positive (a relative output error), got {self.max_layer_error}")
        from edgecompress.plan.targets import check_target

        kinds = [check_target(kind, value)[0] for kind, value in self.targets]
        if self.max_error is not None and not self.max_error > 0:
            raise ConfigError(f"--max-error must be positive (a relative output error, e.g. 0.1), got {self.max_error}")
        if self.max_error is not None and not self.targets:
            raise ConfigError("--max-error bounds the error of a --target plan: add --target KIND=VALUE")
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"one target per kind, got {', '.join(kinds)}")
        if self.precision not in ("fp32", "int8"):
            raise ConfigError(f"precision must be fp32 or int8, got {self.precision!r}")
        if int(self.threads) != self.threads or self.threads < 1:
            raise ConfigError(f"threads must be a whole number >= 1, got {self.threads}")
        for method in self.methods:
            if method != "dense":
                check_method(method)
        for pattern, settings in self.overrides:
            unknown = set(settings) - _LAYER_KEYS
            if unknown:
                raise ConfigError(f"override {pattern!r}: unknown keys {sorted(unknown)}; allowed: {sorted(_LAYER_KEYS)}")
            if settings.get("method", "dense") != "dense":
                check_method(settings["method"])
            self.for_layer(pattern)  # validates the merged spec

    def rank_spec(self) -> RankSpec:
        return RankSpec(self.rank, self.ratio, self.energy, self.rank_multiple)

    def selects(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def named(self, name: str) -> bool:
        """Whether a per-layer override or an include pattern names ``name`` (asks for it explicitly)."""
        return any(fnmatch.fnmatchcase(name, p) for p in (*self.include, *(p for p, _ in self.overrides)))

    def for_layer(self, name: str) -> tuple[str, RankSpec]:
        """(method, rank spec) for the layer at ``name``, overrides applied; method may be 'dense'."""
        method, values = self.method, {"rank": self.rank, "ratio": self.ratio, "energy": self.energy}
        multiple = self.rank_multiple
        for pattern, settings in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                method = settings.get("method", method)
                if {"rank", "ratio", "energy"} & set(settings):
                    values = {k: settings.get(k) for k in ("rank", "ratio", "energy")}
                multiple = settings.get("rank_multiple", multiple)
        return method, RankSpec(values["rank"], values["ratio"], values["energy"], multiple)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file(self) -> dict[str, Any]:
        """The config as a ``--config`` file's table (what ``read_config_file`` reads back to this config)."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("overrides", "targets", "methods", "provider",
                                                                      "threads", "precision") and v not in (None, (), [])}
        data["layers"] = {pattern: dict(settings) for pattern, settings in self.overrides}
        return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML factorization config file into a dict of FactorizeConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/object at the top")
    layers = data.pop("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ConfigError(f"config file {str(path)!r}: 'layers' must map patterns to tables of settings")
    allowed = _LAYER_KEYS | {"include", "exclude", "min_params", "min_outputs", "head_share", "damping", "max_layer_error",
                             "data_free"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"config file {str(path)!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed | {'layers'})}")
    if "include" in data:
        data["include"] = tuple(data["include"])
    if "exclude" in data:
        data["exclude"] = tuple(data["exclude"])
    data["overrides"] = tuple((pattern, dict(settings)) for pattern, settings in layers.items())
    return data
