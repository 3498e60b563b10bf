"""The model zoo: real pretrained models that ship inside PyPI packages."""

from pipeline.zoo import easyocr, minilm, mobilenet, smollm2  # noqa: F401  (registers the loaders)
from pipeline.model import LoadedModel, ModelKind
from pipeline.zoo.registry import load_zoo_model, zoo_names

__all__ = ["LoadedModel", "ModelKind", "load_zoo_model", "zoo_names"]
