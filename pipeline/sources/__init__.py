"""Resolve a model reference to a loaded model.

References: `zoo:NAME` (packaged pretrained models), `hf:DIR` (a local Hugging
Face directory with safetensors), `file:PATH` plus a `module:callable` factory
that builds the architecture (weights from .safetensors, or .pt/.pth read with
`weights_only=True`), `krunch:DIR` and `models:/...` (compressed models, from
safetensors and a manifest). Nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from krunch.errors import ModelSourceError
from krunch.model import LoadedModel
from krunch.sources.hf import load_hf_directory
from krunch.sources.weights import SAFETENSORS_SUFFIXES, load_strict, read_state_dict

REFERENCE_FORMS = ("zoo:NAME, hf:DIR, file:PATH (with a module:callable factory), krunch:DIR (a compressed model), "
                   "models:/NAME/VERSION or models:/NAME@ALIAS (a version krunch registered in MLflow)")


def load_model(reference: str, factory: str | None = None) -> LoadedModel:
    scheme, _, rest = reference.partition(":")
    if not rest:
        raise ModelSourceError(reference, f"not a model reference; use {REFERENCE_FORMS}")
    if scheme == "zoo":
        from krunch.zoo import load_zoo_model  # the zoo's loaders build on this package's readers

        return load_zoo_model(rest)
    if scheme == "hf":
        return load_hf_directory(Path(rest).expanduser(), reference)
    if scheme == "file":
        return load_file_model(Path(rest).expanduser(), reference, factory)
    if scheme == "krunch":
        from krunch.artifact import load_compressed

        return load_compressed(Path(rest).expanduser(), reference, factory=factory)
    if scheme == "models":
        from krunch.sources.registered import load_registered

        return load_registered(reference, factory)
    raise ModelSourceError(reference, f"unknown reference scheme {scheme!r}; use {REFERENCE_FORMS}")


def load_file_model(path: Path, reference: str, factory: str | None) -> LoadedModel:
    """Build the architecture with the user's factory, then load the weight file into it, strictly."""
    state = read_state_dict(path)  # checks existence and safety before any user code runs
    if factory is None:
        raise ModelSourceError(
            reference,
            "a weight file holds no architecture; name a module:callable that builds it "
            "(--factory on the command line, spec.model.factory in a job)",
        )
    built = call_factory(factory)
    loaded = built if isinstance(built, LoadedModel) else LoadedModel(reference=reference, module=built)
    loaded.reference = reference
    load_strict(loaded.module, state, reference)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        loaded.weight_files = (path,)
    loaded.module.eval()
    loaded.metadata.setdefault("factory", factory)
    return loaded


def call_factory(factory: str) -> nn.Module | LoadedModel:
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise ModelSourceError(factory, "factory must be written module:callable, e.g. mypkg.models:build_net")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSourceError(factory, f"cannot import module {module_name!r} ({err})") from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ModelSourceError(factory, f"module {module_name!r} has no callable {attribute!r}")
    built = builder()
    if not isinstance(built, (nn.Module, LoadedModel)):
        raise ModelSourceError(factory, f"factory returned a {type(built).__name__}, expected a torch.nn.Module")
    return built
