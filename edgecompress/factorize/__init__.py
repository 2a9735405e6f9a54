"""Factorization stage: ``factorize(model, config) -> (model, report)``.

Importing this package registers every method module (one module per method).
"""

from edgecompress.factorize import cp, svd, tucker  # noqa: F401  (registration: one module per method)
from edgecompress.factorize import embedding, tt  # noqa: F401  (registration: tt, tt-naive, svd on Embedding)
from edgecompress.factorize.api import FactorizeReport, factorize, factorize_, relative_error
from edgecompress.factorize.base import FactorizedLayer, LayerRecord, SkipLayer
from edgecompress.factorize.config import FactorizeConfig, read_config_file
from edgecompress.factorize.planning import plan
from edgecompress.factorize.ranks import RankSpec
from edgecompress.factorize.registry import Decomposition, methods, register

__all__ = [
    "Decomposition", "FactorizeConfig", "FactorizeReport", "FactorizedLayer", "LayerRecord", "RankSpec",
    "SkipLayer", "factorize", "factorize_", "methods", "plan", "read_config_file", "register", "relative_error",
]
