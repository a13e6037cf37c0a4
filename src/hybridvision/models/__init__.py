"""Model families. Importing this package registers every hybridvision model in timm's registry."""
from hybridvision.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
