"""Token-by-token generation on one compiled graph per step.

At batch 1 most of an eager decode step is not the matmuls but the hundreds of small ops around them
(norms, rotary, cache updates) and Python between them; inductor fuses those into a few kernels and keeps
the quantized matmuls as they are. Two ways in: `compile_decode` sets up transformers' own `generate` to
compile its steps (the model object is unchanged), and `greedy_decode` is a lean greedy loop over the same
compiled step, without `generate`'s per-token logits processing and stopping checks.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEFAULT_MAX_CACHE_LEN = 512  # attention reads the whole static cache every step: size it for the workload
CACHE_LEN_STEP = 256  # greedy_decode rounds its cache up to this, so most calls reuse one compiled graph
DECODE_ATTENTION = "krunch_decode"


def compile_decode(model: nn.Module, *, max_cache_len: int = DEFAULT_MAX_CACHE_LEN, mode: str = "default") -> nn.Module:
    """Make `model.generate` run each decode step on a compiled graph over a static KV cache of
    `max_cache_len` positions (prompt plus new tokens; longer generations grow it and compile again), with
    single-token attention as two small matmuls (`use_decode_attention`). The first `generate` call
    compiles (tens of seconds on a small CPU; inductor caches it on disk); prefill stays eager. Returns the
    model; `model.generation_config.compile_config = None` undoes the compiling."""
    generation_config = _generation_config(model, "compile_decode")
    if max_cache_len < 2:
        raise ValueError(f"max_cache_len must be at least 2, got {max_cache_len}")
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers compiles by itself on accelerators only
    generation_config.cache_implementation = "static"
    generation_config.max_cache_len = max_cache_len
    generation_config.compile_config = config
    use_decode_attention(model)
    return model


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, max_cache_len: int | None = None, compile: bool = True) -> torch.Tensor:  # fmt: skip
    """Greedy generation as `model.generate(input_ids, do_sample=False)` gives it, for prompts of one length
    (no padding): prefill eagerly into a static cache, then each new token from one compiled step (the
    forward and the argmax) and nothing else. Stops after `max_new_tokens`, or when every row has produced
    an `eos_token_id` (rows that finish first continue with `pad_token_id`, as `generate` does). The cache holds prompt plus new tokens rounded up to 256 positions unless
    `max_cache_len` says otherwise; each new cache size compiles once. Returns prompt and new tokens."""
    _generation_config(model, "greedy_decode")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids of shape (batch, length), got {tuple(input_ids.shape)} {input_ids.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, length = input_ids.shape
    needed = length + max_new_tokens
    cache_len = max_cache_len if max_cache_len is not None else -(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP
    if cache_len < needed:
        raise ValueError(f"max_cache_len {cache_len} is shorter than the prompt plus max_new_tokens ({needed})")
    from transformers import StaticCache

    use_decode_attention(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    tokens = [input_ids.to(device)]
    stop = None if eos_token_id is None else torch.tensor(eos_token_id, device=device).reshape(-1)
    pad = pad_token_id if pad_token_id is not None else int(stop[0]) if stop is not None else 0
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    with torch.inference_mode():
        token = _next_tokens(model, cache, tokens[0], torch.arange(length, device=device))
        step = _compiled_step(model) if compile else _next_tokens  # after prefill has packed the kernels
        for position in range(length, needed):
            if stop is not None:
                token = token.masked_fill(finished, pad)
                finished |= torch.isin(token, stop)
            tokens.append(token)
            if stop is not None and bool(finished.all()):
                break
            if position + 1 < needed:
                token = step(model, cache, token, torch.tensor([position], device=device))
    return torch.cat(tokens, dim=1)


def use_decode_attention(model: nn.Module) -> None:
    """Attention of a single new token as two small matmuls over the cache (grouped heads without copying
    them), all other calls on PyTorch's SDPA as before: SDPA's flash kernel is built for long queries, and
    for one query it costs several times the matmuls on a small CPU (docs/kernels.md)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager", DECODE_ATTENTION):
        model.set_attn_implementation(DECODE_ATTENTION)


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention signature: query (batch, heads, q, dim), key and value (batch, kv_heads,
    cache, dim), the mask boolean (True attends) or additive; returns (batch, q, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    single = query.shape[2] == 1 and not module.training and kwargs.get("softcap") is None
    if not single or getattr(module, "sinks", None) is not None or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads kv head h // groups
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(weights, value).reshape(batch, heads, 1, dim)
    return output.transpose(1, 2), None


def _next_tokens(model: nn.Module, cache: Any, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The greedy next token of each row after `tokens` at cache `positions`: (batch, 1)."""
    out = model(input_ids=tokens, past_key_values=cache, cache_position=positions,
                position_ids=positions.unsqueeze(0).expand(tokens.shape[0], -1), use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1].argmax(-1, keepdim=True)


# model -> (its structure when its step was compiled, the step): one compiled step per model, see _compiled_step
_STEPS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Callable[..., torch.Tensor]]] = weakref.WeakKeyDictionary()


def _compiled_step(model: nn.Module) -> Callable[..., torch.Tensor]:
    """`_next_tokens` compiled for this model as it is now. Dynamo's guards on the model's modules and
    their ~800 weights, scales and norms cost about a tenth of a SmolLM2 int8 step at batch 1
    (docs/kernels.md), so the step skips them (guards on the tokens, positions and cache stay) and is
    instead checked here once per call: a step of its own for each model (its own code object, so no
    other model's graph can match it), compiled again when a module, parameter or buffer was swapped."""
    structure = (_structure(model), getattr(getattr(model, "config", None), "_attn_implementation", None))
    entry = _STEPS.get(model)
    if entry is None or entry[0] != structure:
        code = _next_tokens.__code__.replace()  # a copy: dynamo keeps its graphs on the code object
        function = types.FunctionType(code, _next_tokens.__globals__, _next_tokens.__name__)
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        entry = (structure, torch.compile(function, dynamic=False, fullgraph=False, options=options))
        _STEPS[model] = entry
    return entry[1]


def _structure(model: nn.Module) -> tuple:
    """What a compiled step assumes of the model beyond its tensors' values: each module's attributes
    (flags by value, tensors by identity, shape and dtype, other objects such as a kernel pack by identity),
    its parameters and buffers, and its hooks."""
    return tuple((name, type(module), _attributes(vars(module))) for name, module in model.named_modules())


def _attributes(attributes: dict[str, Any]) -> tuple:
    described = []
    for key, value in attributes.items():
        if isinstance(value, dict):  # _parameters, _buffers, hooks, ...: entries, not the dict object
            value = (len(value), _attributes({str(k): v for k, v in value.items()})) if key != "_modules" else len(value)
        elif isinstance(value, torch.Tensor):
            value = (id(value), value.shape, value.dtype, value.device)
        elif not isinstance(value, (bool, int, float, str, type(None))):
            value = id(value)
        described.append((key, value))
    return tuple(described)


def _generation_config(model: nn.Module, caller: str) -> Any:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or not hasattr(model, "generate"):
        raise TypeError(f"{caller} needs a transformers model with generate(), got {type(model).__name__}")
    return generation_config
