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


def causal_lm_speed(module: nn.Module, ids: list[int]) -> dict[str, float | int]:
    """Greedy decode of DECODE_TOKENS after a DECODE_PROMPT-token prompt, and one PREFILL_TOKENS forward
    that keeps the last logits, after a warm-up (kernels pack their weights on first use)."""
    prompt = torch.tensor([ids[:DECODE_PROMPT]])
    prefill = torch.tensor([ids[:PREFILL_TOKENS]])
    with torch.inference_mode():
        generate(module, prompt, 4)
        cpu, start = cpu_seconds(), time.perf_counter()
        generate(module, prompt, DECODE_TOKENS)
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
    }
