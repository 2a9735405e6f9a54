"""The reference model zoo: ``create_model(name)``, ``list_models()``, ``get_spec(name)``.

Importing this package registers every zoo model (each module registers its entries).
"""

from edgecompress.models import convnets, digits, mobilenet, resnet, text  # noqa: F401  (registration)
from edgecompress.models.registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
