"""krunch: compress PyTorch models with tensor networks and quantization, and run them faster.

    import krunch
    result = krunch.compress(model, recipe, calibration=texts, tokenizer=tokenizer)
    krunch.save(result, "out/")
    krunch.register(result, "my-model", alias="candidate")   # a new MLflow version

The functions are imported on first use, so `import krunch` stays light (the operator and the consumer
runtime import parts of this package without torch's compression stack). The operator is
`krunch.operator`, consumers need only `krunch.runtime`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Compressed", "compress", "evaluate", "load", "register", "save"]

if TYPE_CHECKING:
    from krunch.api import Compressed, compress, evaluate, register
    from krunch.store import load, save


def __getattr__(name: str) -> Any:
    if name in ("load", "save"):  # loading needs none of the compression stack
        from krunch import store

        return getattr(store, name)
    if name in __all__:
        from krunch import api

        return getattr(api, name)
    raise AttributeError(f"module 'krunch' has no attribute {name!r}")
