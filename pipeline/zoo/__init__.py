"""The model zoo: real pretrained models that ship inside PyPI packages."""

from krunch.zoo import easyocr, minilm, mobilenet, qwen_coder, smollm2  # noqa: F401  (registers the loaders)
from krunch.model import LoadedModel, ModelKind
from krunch.zoo.registry import load_zoo_model, zoo_names

__all__ = ["LoadedModel", "ModelKind", "load_zoo_model", "zoo_names"]
