"""What a registered model carries so that consumers without krunch can load it.

`mlflow.pytorch.load_model` unpickles the module; the compressed layers'
classes live in krunch, so the model ships `krunch.runtime` and the packaged
architectures (MLflow's `code_paths`, put first on `sys.path` at load time)
under a package named after their content (`krunch_<digest>`), and the pickle
refers to that name: a consumer's own `krunch` or `pipeline`, and a second
model made by another krunch version in the same process, each keep their
code. They import only torch: pydantic, tensorly, Ray and the rest of krunch
stay behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from krunch import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # pipeline/, installed as krunch
# Everything a pickled compressed model refers to, and nothing else.
RUNTIME_PACKAGES = ("runtime", "architectures")
RUNTIME_INIT = f'''"""krunch {__version__}: the runtime subset shipped with a registered model (torch only)."""

__version__ = "{__version__}"
'''


def runtime_namespace() -> str:
    """`krunch_<digest of the shipped files>`: two krunch versions whose runtimes differ never share a name."""
    digest = hashlib.sha256(__version__.encode())
    for name in RUNTIME_PACKAGES:
        for path in sorted((PACKAGE_ROOT / name).rglob("*.py")):
            digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"krunch_{digest.hexdigest()[:12]}"


def runtime_code(scratch: Path, namespace: str) -> Path:
    """Copy the runtime subset of the `krunch` package into scratch/<namespace>; returns that directory."""
    target = scratch / namespace
    target.mkdir(parents=True, exist_ok=True)
    (target / "__init__.py").write_text(RUNTIME_INIT, encoding="utf-8")
    for name in RUNTIME_PACKAGES:
        shutil.copytree(PACKAGE_ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@contextlib.contextmanager
def pickled_as(namespace: str) -> Iterator[None]:
    """While pickling, the runtime's classes and functions name `namespace.runtime...` (aliases of the loaded modules in
    `sys.modules`, which pickle checks); afterwards everything is as it was."""
    shipped = {name: module for name, module in list(sys.modules.items())
               if module is not None and name.startswith(tuple(f"krunch.{p}" for p in RUNTIME_PACKAGES))}  # fmt: skip
    aliases = {namespace: types.ModuleType(namespace)} | {
        namespace + name.removeprefix("krunch"): module for name, module in shipped.items()}  # fmt: skip
    renamed = [(obj, obj.__module__) for name, module in shipped.items() for obj in vars(module).values()
               if isinstance(obj, type | types.FunctionType) and obj.__module__ == name]  # classes, and functions a model holds (hooks)
    sys.modules.update(aliases)
    try:
        for obj, module_name in renamed:
            obj.__module__ = namespace + module_name.removeprefix("krunch")
        yield
    finally:
        for obj, module_name in renamed:
            obj.__module__ = module_name
        for name in aliases:
            sys.modules.pop(name, None)


def pip_requirements(module: nn.Module) -> list[str]:
    """Pinned to what made the model: the pickle holds torch (and transformers) classes by reference."""
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if type(module).__module__.startswith("transformers."):
        requirements.append(f"transformers=={importlib.metadata.version('transformers')}")
    return requirements
