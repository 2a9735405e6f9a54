"""Fine-tuning wins back accuracy: tucker at >= 2x whole-model compression on the digits model
loses at most 1 point after 3 epochs of distillation, and its int8 version at most 1 point more."""

import pytest

from edgecompress.pipeline import RunConfig, run


pytestmark = pytest.mark.slow  # 3 epochs of distillation: ~30 s on 2 quiet cores


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    config = RunConfig(methods=("tucker",), ratios=(2.0,), finetune_epochs=3, threads=(1,), bench_runs=3, bench_warmup=1)
    return run(None, tmp_path_factory.mktemp("finetune"), config)


def test_finetuned_factorized_model_keeps_accuracy(report):
    dense, tucker = report.variant("dense"), report.variant("tucker-x2")
    assert tucker.status == "ok" and tucker.compression >= 2.0
    assert tucker.finetune["loss_kind"] == "kl" and 1 <= len(tucker.finetune["loss"]) <= 3
    assert tucker.finetune["epochs"][0]["epoch"] == 0 and "kept_epoch" in tucker.finetune  # scored per epoch
    assert tucker.accuracy >= dense.accuracy - 0.01, (dense.accuracy, tucker.accuracy)


def test_int8_of_finetuned_model_loses_at_most_one_more_point(report):
    tucker, int8 = report.variant("tucker-x2"), report.variant("tucker-x2-int8")
    assert int8.status == "ok" and int8.accuracy >= tucker.accuracy - 0.01, (tucker.accuracy, int8.accuracy)
