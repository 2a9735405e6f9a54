"""The reference model zoo: ``create_model(name)``, ``list_models()``, ``get_spec(name)``.

Importing this package registers every zoo model (each module registers its entries).
"""

from edgecompress.models import convnets, crepe, digits, mobilenet, resnet, text  # noqa: F401  (registration)
from edgecompress.models.registry import ModelSpec, create_model, get_spec, list_models, register_model

DEFAULT_MODEL = "digits_cnn"  # the bundled default: trained on real digits, weights and held-out set shipped

__all__ = ["DEFAULT_MODEL", "ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
