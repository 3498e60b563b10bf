"""Resolve a model reference to a loaded model.

References: `zoo:NAME` (packaged pretrained models), `hf:DIR` (a local Hugging
Face directory with safetensors), `file:PATH` plus a `module:callable` factory
that builds the architecture (weights from .safetensors, or .pt/.pth read with
`weights_only=True`), `krunch:DIR` and `models:/...` (compressed models, from
safetensors and a manifest). Nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

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


def import_factory_module(factory: str, module_name: str) -> ModuleType:
    """`path/to/file.py` loads that file; a dotted name is imported with the working directory on the path,
    as `python -m` would (a console script does not put it there)."""
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise ModelSourceError(factory, f"no file {path}")
        name = f"krunch_factory_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    cwd_missing = os.getcwd() not in sys.path and "" not in sys.path
    if cwd_missing:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    finally:
        if cwd_missing:
            sys.path.remove(os.getcwd())


def call_factory(factory: str) -> nn.Module | LoadedModel:
    """Build the architecture with a factory the user named (never one a file names)."""
    module_name, _, attribute = factory.rpartition(":")
    if not module_name or not attribute:
        raise ModelSourceError(factory, "factory must be written module:callable or path/to/file.py:callable, "
                                        "e.g. mypkg.models:build_net")  # fmt: skip
    try:
        module = import_factory_module(factory, module_name)
    except ImportError as err:
        raise ModelSourceError(factory, f"cannot import module {module_name!r} ({err})") from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ModelSourceError(factory, f"module {module_name!r} has no callable {attribute!r}")
    built = builder()
    if not isinstance(built, (nn.Module, LoadedModel)):
        raise ModelSourceError(factory, f"factory returned a {type(built).__name__}, expected a torch.nn.Module")
    return built
