"""Capture stage: calibration samples in, each candidate layer's inputs and statistics out.

``CalibrationSet`` holds the samples (split into a fitting part and a held-out part). A capture gives,
for one layer at a time and in forward order, the inputs that layer sees in the dense model and in the
model as compressed so far (``LayerInputs``), from torch hooks (``TorchCapture``) or from onnxruntime with
extra graph outputs (``OnnxCapture``). ``layer_stats`` turns them into the second moments the data-aware
decompositions need. Everything after the capture is one code path for PyTorch and ONNX input.
"""

from edgecompress.capture.onnx_capture import OnnxCapture
from edgecompress.capture.samples import CalibrationSet, calibration_set
from edgecompress.capture.stats import LayerInputs, LayerStats, layer_stats
from edgecompress.capture.torch_capture import TorchCapture

__all__ = ["CalibrationSet", "LayerInputs", "LayerStats", "OnnxCapture", "TorchCapture", "calibration_set", "layer_stats"]
