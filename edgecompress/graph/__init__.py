"""ONNX input: reading a graph's weight layers (``read``), splicing factorized chains back (``splice``), and the
whole step for a file (``factorize``: ``factorize_onnx``, ``export_factorized_onnx``)."""

from edgecompress.graph.factorize import METHODS, export_factorized_onnx, factorize_onnx

__all__ = ["METHODS", "export_factorized_onnx", "factorize_onnx"]
