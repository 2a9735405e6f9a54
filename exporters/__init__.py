"""Export stage: torch -> ONNX (with readable node names), onnxsim, checks, parity on onnxruntime."""

from edgecompress.exporters.onnx_tools import (CHAIN_OPS, check_model, drop_unused_initializers, foreign_ops, nodes_under,
                                              op_counts, param_count, simplify, strip_value_info,
                                              subgraph_reads)
from edgecompress.exporters.parity import ParityResult, check_parity, compare, compare_models, torch_outputs
from edgecompress.exporters.torch_export import export_onnx, fold_batchnorm_, name_nodes

__all__ = [
    "CHAIN_OPS", "ParityResult", "check_model", "check_parity", "compare", "compare_models", "drop_unused_initializers",
    "export_onnx", "fold_batchnorm_", "foreign_ops", "name_nodes", "nodes_under", "op_counts", "param_count", "simplify", "strip_value_info",
    "subgraph_reads", "torch_outputs",
]
