"""Capturing layer inputs of a PyTorch model with forward pre-hooks.

``TorchCapture`` serves the factorization loop: ``order`` finds the candidate layers' forward order
(one forward pass), ``inputs(name)`` gives that layer's input batches in the dense model and in the working
model (the one being factorized in place, so the layers before ``name`` are already chains). A forward
stops as soon as the layer's input is caught, so the layers after it are not run. The dense inputs of
every layer are caught in one pass and kept while they fit ``memory_cap``; beyond it each layer re-runs
the dense model. A model whose forward only takes one sample at a time is fed sample by sample.

The chains fitted so far are replayed, not run again, while later layers' inputs are caught: each chain's
outputs on its own inputs are kept (within ``memory_cap`` too), since the layers before it no longer change.
A chain dearer than its dense layer would otherwise be paid once per later layer (CREPE full, tt 4x: its
conv2 chain costs 12.5 GMAC a sample, 11.7x the dense conv's, and five later layers ran it on every sample).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from edgecompress.capture.downstream import Downstream, torch_downstream
from edgecompress.capture.samples import CalibrationSet
from edgecompress.capture.stats import LayerInputs
from edgecompress.errors import ConfigError
from edgecompress.factorize.base import in_torch_only

MEMORY_CAP = 1 << 30  # bytes of dense-model layer inputs kept between layers


class _Stop(Exception):
    """Raised by a hook once every wanted input is caught: the rest of the forward is not needed."""


def _tensor(batch: dict[str, np.ndarray]) -> torch.Tensor:
    (array,) = batch.values()
    return torch.from_numpy(np.ascontiguousarray(array))


@torch.no_grad()
def catch_inputs(model: nn.Module, names: Iterable[str], x: torch.Tensor, stop: bool = True) -> dict[str, torch.Tensor]:
    """The first input each layer in ``names`` gets when ``model`` runs on ``x`` (stopping once all are in)."""
    names = list(names)
    caught: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            if name not in caught:
                caught[name] = args[0].detach()
                if stop and len(caught) == len(names):
                    raise _Stop
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return caught


def _catch(model: nn.Module, names: list[str], x: torch.Tensor, stop: bool = True) -> dict[str, torch.Tensor]:
    try:
        return catch_inputs(model, names, x, stop)
    except _Stop:
        raise
    except Exception:
        if len(x) == 1:
            raise
    parts = [catch_inputs(model, names, x[k:k + 1], stop) for k in range(len(x))]  # a batch-1-only forward
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def _outputs(result) -> torch.Tensor:
    """A model's outputs (a tensor, or a tuple / list / dict of them) as one flat float64 vector per call."""
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return torch.cat([_outputs(r) for r in result])
    return result.detach().double().reshape(-1)


def relative_error(reference: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """``||approx - reference|| / ||reference||`` over lists of flat outputs."""
    energy = sum(float(r.pow(2).sum()) for r in reference) or 1e-30
    return (sum(float((a - r).pow(2).sum()) for a, r in zip(approx, reference)) / energy) ** 0.5


class _Replay(nn.Module):
    """Stands in for a fitted chain while inputs are caught: batch ``index``'s kept output on its first call,
    the chain itself otherwise (a second call in one forward, or an input of another shape)."""

    def __init__(self, chain: nn.Module, outputs: list[torch.Tensor]):
        super().__init__()
        self.chain, self.outputs, self.index, self.calls = chain, outputs, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.outputs[self.index]
        if self.calls == 1 and out.shape[0] == x.shape[0]:
            return out.clone()  # an in-place op after it (ReLU(inplace=True)) must not change the kept one
        return self.chain(x)


class TorchCapture:
    """Layer inputs of ``model`` (factorized in place as the loop goes) and of its ``dense`` original."""

    def __init__(self, model: nn.Module, dense: nn.Module, calib: CalibrationSet, sequential: bool = True,
                 memory_cap: int = MEMORY_CAP):
        self.model, self.dense, self.calib, self.sequential = model.eval(), dense.eval(), calib, sequential
        self.memory_cap = memory_cap
        self._dense_cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._final: list[torch.Tensor] | None = None
        self._downstream: dict[str, Downstream] | None = None
        self._last: tuple[str, list[torch.Tensor]] | None = None  # the inputs ``inputs`` gave last
        self._replays: dict[str, list[torch.Tensor]] = {}  # a fitted chain's outputs per fit + held batch
        self._replay_bytes = 0

    def downstream(self, name: str) -> Downstream | None:
        """What layer ``name``'s output goes through in the dense model (``capture.downstream``), if anything."""
        if self._downstream is None:
            from edgecompress.factorize.registry import candidate_types

            self._downstream = torch_downstream(self.dense, [n for n, m in self.dense.named_modules()
                                                             if n and isinstance(m, candidate_types())])
        return self._downstream.get(name)

    def order(self, names: list[str]) -> list[str]:
        """``names`` in the order the forward pass calls them; layers it never calls are left out."""
        seen = catch_inputs(self.model, names, _tensor(self.calib.fit[0])[:1], stop=False)
        return list(seen)

    def inputs(self, name: str) -> LayerInputs:
        dense, held_dense = self._dense_inputs(name)
        if not self.sequential:
            return LayerInputs(dense, dense, held_dense, held_dense, downstream=self.downstream(name))
        caught = self._catch_current(name)
        current, held = caught[:len(self.calib.fit)], caught[len(self.calib.fit):]
        self._last = (name, caught)
        return LayerInputs(dense, current, held_dense, held, downstream=self.downstream(name))

    @in_torch_only()
    def _catch_current(self, name: str) -> list[torch.Tensor]:
        """Layer ``name``'s input in the working model, per fit and held batch, the fitted chains replayed."""
        replays = {n: _Replay(self.model.get_submodule(n), outs) for n, outs in self._replays.items()}
        for n, replay in replays.items():
            self.model.set_submodule(n, replay)
        try:
            caught = []
            for index, batch in enumerate(self.calib.fit + self.calib.held):
                for replay in replays.values():
                    replay.index, replay.calls = index, 0
                caught.append(_catch(self.model, [name], _tensor(batch))[name])
            return caught
        finally:
            for n, replay in replays.items():
                self.model.set_submodule(n, replay.chain)

    def dense_inputs(self, name: str) -> LayerInputs:
        """The layer's inputs in the dense model only (what a plan scores its candidates on); kept cached."""
        dense, held_dense = self._dense_inputs(name, keep=True)
        return LayerInputs(dense, dense, held_dense, held_dense, downstream=self.downstream(name))

    @torch.no_grad()
    @in_torch_only()
    def replace(self, name: str, module: nn.Module) -> None:
        """The loop swaps the chain into ``model`` itself; its outputs on the inputs it was fitted on are kept
        for the later layers' captures, while they fit the memory cap."""
        if not self.sequential or self._last is None or self._last[0] != name:
            return
        outputs = [module(x) for x in self._last[1]]
        size = sum(t.numel() * t.element_size() for t in outputs)
        if self._replay_bytes + size <= self.memory_cap:
            self._replays[name] = outputs
            self._replay_bytes += size
        self._last = None

    @torch.no_grad()
    def model_error(self, chains: dict[str, nn.Module]) -> float:
        """Relative error of the model's outputs on the held-out samples with all of ``chains`` in place
        (the model being factorized already holds them), against the dense model's."""
        for name, chain in chains.items():
            if self.model.get_submodule(name) is not chain:
                self.model.set_submodule(name, chain)
        return self._model_error()

    @torch.no_grad()
    def final_error(self, name: str, module: nn.Module) -> float:
        """Relative error of the model's outputs on the held-out samples, with ``module`` in place of layer
        ``name`` (and the layers fitted so far), against the dense model's: the end-to-end check of a fit."""
        original = self.model.get_submodule(name)
        self.model.set_submodule(name, module)
        try:
            return self._model_error()
        finally:
            self.model.set_submodule(name, original)

    @in_torch_only()
    def _model_error(self) -> float:
        if self._final is None:  # the dense model's held-out outputs, once
            self._final = [_outputs(self.dense(_tensor(b))) for b in self.calib.evaluation()]
        return relative_error(self._final, [_outputs(self.model(_tensor(b))) for b in self.calib.evaluation()])

    def _dense_inputs(self, name: str, keep: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._dense_cache is None:
            self._dense_cache = self._cache_all()
        if name in self._dense_cache:
            return self._dense_cache[name] if keep else self._dense_cache.pop(name)
        fit = [_catch(self.dense, [name], _tensor(b))[name] for b in self.calib.fit]
        return fit, [_catch(self.dense, [name], _tensor(b))[name] for b in self.calib.held]

    def _cache_all(self) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Every candidate layer's dense inputs from one pass per batch, if they fit the memory cap."""
        from edgecompress.factorize.registry import candidate_types

        names = [n for n, m in self.dense.named_modules() if n and isinstance(m, candidate_types())]
        batches = self.calib.fit + self.calib.held
        if not names or not batches:
            return {}
        first = _catch(self.dense, names, _tensor(batches[0]), stop=False)
        per_batch = sum(t.numel() * t.element_size() for t in first.values())
        if per_batch * len(batches) > self.memory_cap:
            return {}
        caught = [first] + [_catch(self.dense, names, _tensor(b), stop=False) for b in batches[1:]]
        fit = len(self.calib.fit)
        return {n: ([c[n] for c in caught[:fit]], [c[n] for c in caught[fit:]]) for n in first}


def check_fits(model: nn.Module, calib: CalibrationSet) -> None:
    """Run ``model`` on one calibration sample: data that does not fit the model fails here, in one line."""
    x = _tensor(calib.fit[0])[:1]
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise ConfigError(f"calibration data of shape {list(x.shape[1:])} per sample does not fit the model: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
