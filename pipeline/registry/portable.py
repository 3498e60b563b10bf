"""What a registered model carries so that consumers without krunch can load it.

`mlflow.pytorch.load_model` unpickles the module; the compressed layers'
classes live in krunch, so the model ships `krunch.runtime` and the packaged
architectures (MLflow's `code_paths`, put first on `sys.path` at load time)
under a `krunch/__init__.py` of its own that imports nothing. They import only
torch: pydantic, tensorly, Ray and the rest of krunch stay behind.
"""

from __future__ import annotations

import importlib.metadata
import shutil
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


def runtime_code(scratch: Path) -> Path:
    """Copy the runtime subset of the `krunch` package into scratch/krunch; returns that directory."""
    target = scratch / "krunch"
    target.mkdir(parents=True, exist_ok=True)
    (target / "__init__.py").write_text(RUNTIME_INIT, encoding="utf-8")
    for name in RUNTIME_PACKAGES:
        shutil.copytree(PACKAGE_ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def pip_requirements(module: nn.Module) -> list[str]:
    """Pinned to what made the model: the pickle holds torch (and transformers) classes by reference."""
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if type(module).__module__.startswith("transformers."):
        requirements.append(f"transformers=={importlib.metadata.version('transformers')}")
    return requirements
