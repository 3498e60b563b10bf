"""What a registered model carries so that consumers without krunch can load it.

`mlflow.pytorch.load_model` unpickles the module; the compressed layers'
classes live in krunch, so the model ships the few krunch modules that define
them (MLflow's `code_paths`, put on `sys.path` at load time) and declares the
packages they import. Those modules import only torch, pydantic and PyYAML
(MLflow's own dependencies): tensorly, Ray and the rest of krunch stay behind.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import torch
from torch import nn

PACKAGE_ROOT = Path(__file__).resolve().parent
# Everything the compressed layers and the packaged architectures import, and nothing else.
RUNTIME_PATHS = ("__init__.py", "errors.py", "spec.py", "quantize.py", "layers", "decompose", "architectures")


def runtime_code(scratch: Path) -> Path:
    """Copy the runtime subset of the `pipeline` package into scratch/pipeline; returns that directory."""
    target = scratch / "pipeline"
    target.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_PATHS:
        source = PACKAGE_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


def pip_requirements(module: nn.Module) -> list[str]:
    """Pinned to what made the model: the pickle holds torch (and transformers) classes by reference."""
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"pydantic=={importlib.metadata.version('pydantic')}",
                    f"pyyaml=={importlib.metadata.version('pyyaml')}"]  # fmt: skip
    if type(module).__module__.startswith("transformers."):
        requirements.append(f"transformers=={importlib.metadata.version('transformers')}")
    return requirements
