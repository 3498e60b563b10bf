"""Token-by-token generation on one compiled graph per step.

At batch 1 most of an eager decode step is not the matmuls but the hundreds of small ops around them
(norms, rotary, cache updates) and Python between them; inductor fuses those into a few kernels and keeps
the quantized matmuls as they are. transformers does the compiling inside `generate` when the cache is
static and the generation config asks for it; this sets that up, so the model object is unchanged.
"""

from __future__ import annotations

from torch import nn

DEFAULT_MAX_CACHE_LEN = 512  # attention reads the whole static cache every step: size it for the workload


def compile_decode(model: nn.Module, *, max_cache_len: int = DEFAULT_MAX_CACHE_LEN, mode: str = "default") -> nn.Module:
    """Make `model.generate` run each decode step on a compiled graph over a static KV cache of
    `max_cache_len` positions (prompt plus new tokens; longer generations grow it and compile again).
    The first `generate` call compiles (tens of seconds on a small CPU; inductor caches it on disk);
    prefill stays eager. Returns the model; `model.generation_config.compile_config = None` undoes it."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or not hasattr(model, "generate"):
        raise TypeError(f"compile_decode needs a transformers model with generate(), got {type(model).__name__}")
    if max_cache_len < 2:
        raise ValueError(f"max_cache_len must be at least 2, got {max_cache_len}")
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers compiles by itself on accelerators only
    generation_config.cache_implementation = "static"
    generation_config.max_cache_len = max_cache_len
    generation_config.compile_config = config
    return model

