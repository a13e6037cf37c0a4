"""Model families. Importing this package registers every hybridvision model in timm's registry."""
from hybridvision.models import coatnet  # noqa: F401
from hybridvision.models import parc_convnets, parc_net  # noqa: F401
from hybridvision.models.convert import parcify
from hybridvision.models.registry import create_model, list_models

__all__ = ["create_model", "list_models", "parcify"]
