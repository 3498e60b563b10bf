"""What a user of a causal LM feels: batch-1 decode tokens/s with a KV cache, prefill tokens/s, CPU seconds
per generated token (user + system: the energy proxy) and the memory the model's tensors hold."""

from __future__ import annotations

import resource
import time

import torch
from torch import nn

from krunch.sizes import tensor_bytes

DECODE_PROMPT, DECODE_TOKENS, PREFILL_TOKENS = 64, 128, 512


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(module: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return module.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip


def causal_lm_speed(module: nn.Module, ids: list[int], compiled_decode: bool = False) -> dict[str, float | int]:
    """Greedy decode of DECODE_TOKENS after a DECODE_PROMPT-token prompt, and one PREFILL_TOKENS forward
    that keeps the last logits, after a warm-up (kernels pack their weights on first use); with
    `compiled_decode`, the same decode through `greedy_decode` too (`compiled_decode_speed`)."""
    prompt = torch.tensor([ids[:DECODE_PROMPT]])
    prefill = torch.tensor([ids[:PREFILL_TOKENS]])
    with torch.inference_mode():
        generate(module, prompt, 4)
        cpu, start = cpu_seconds(), time.perf_counter()
        eager = generate(module, prompt, DECODE_TOKENS)
        decode_s, decode_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        module(prefill[:, :64], logits_to_keep=1)
        start = time.perf_counter()
        module(prefill, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
    return {
        "decode_tokens_per_s": round(DECODE_TOKENS / decode_s, 3),
        "prefill_tokens_per_s": round(prefill.shape[1] / prefill_s, 2),
        "cpu_s_per_token": round(decode_cpu / DECODE_TOKENS, 5),
        "memory_bytes": tensor_bytes(module),
        **(compiled_decode_speed(module, prompt, eager) if compiled_decode else {}),
    }


def compiled_decode_speed(module: nn.Module, prompt: torch.Tensor, eager: torch.Tensor) -> dict[str, float | int]:
    """The same greedy decode through `krunch.runtime.greedy_decode`, one compiled step per token: what a user
    who serves the model that way gets. Compiling (tens of seconds on a small CPU) is timed apart; the new
    tokens are compared with eager `generate`'s (`eager`: how many lead alike; a compiled int8 step computes
    in fp32, eager in bf16, so a near tie may go the other way); the model's attention implementation is
    restored."""
    from krunch.runtime import greedy_decode

    attention = getattr(module.config, "_attn_implementation", None)
    try:
        start = time.perf_counter()
        greedy_decode(module, prompt, 4)
        warm_up_s = time.perf_counter() - start
        cpu, start = cpu_seconds(), time.perf_counter()
        compiled = greedy_decode(module, prompt, DECODE_TOKENS)
        decode_s, decode_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        if attention is not None and module.config._attn_implementation != attention:
            module.set_attn_implementation(attention)
    return {
        "compiled_decode_tokens_per_s": round(DECODE_TOKENS / decode_s, 3),
        "compiled_cpu_s_per_token": round(decode_cpu / DECODE_TOKENS, 5),
        "compiled_warm_up_s": round(warm_up_s, 2),
        "compiled_tokens_as_eager": leading_agreement(compiled[0, prompt.shape[1] :], eager[0, prompt.shape[1] :]),
    }


def leading_agreement(tokens: torch.Tensor, expected: torch.Tensor) -> int:
    """How many tokens lead alike in two generations (all of them when equal)."""
    differ = (tokens != expected).nonzero()
    return int(differ[0, 0]) if len(differ) else len(tokens)
