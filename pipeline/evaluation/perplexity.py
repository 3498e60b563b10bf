"""Perplexity of a causal LM on a fixed slice of held-out text, in non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from krunch.data.text import Split, special_tokens, token_slice
from krunch.errors import KrunchError
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, evaluator
from krunch.evaluation.speed import PREFILL_TOKENS, causal_lm_speed
from krunch.evaluation.timing import timed_batches
from krunch.model import LoadedModel, ModelKind

DEFAULT_DATA = "wikipedia"


def token_windows(tokenizer, ids: list[int], window: int) -> list[list[int]]:
    """`ids` cut into non-overlapping windows of `window` tokens, each led by the tokenizer's own leading special
    tokens (a BOS model reads its BOS first, as in use); a partial last window is dropped. Peers in the
    benchmarks are scored on these very windows."""
    first, _ = special_tokens(tokenizer)
    text = window - len(first)
    return [first + ids[start : start + text] for start in range(0, len(ids) // text * text, text)]


@evaluator(Task.PERPLEXITY, ModelKind.CAUSAL_LM)
def perplexity(model: LoadedModel, options: EvalOptions, reference: LoadedModel | None = None) -> Metrics:
    if model.tokenizer is None:
        raise KrunchError(model.reference, "perplexity needs a tokenizer; load the model from a HF directory")
    if options.tokens < options.window:
        raise KrunchError("--tokens", f"must be at least the window size {options.window}, got {options.tokens}")
    data = options.data or DEFAULT_DATA
    ids = token_slice(model.tokenizer, data, Split.EVALUATION, options.tokens)
    first, _ = special_tokens(model.tokenizer)
    windows = torch.tensor(token_windows(model.tokenizer, ids, options.window))
    usable = windows.shape[0] * (options.window - len(first))
    batches = [windows[i : i + 1] for i in range(len(windows))]

    def negative_log_likelihood(batch: torch.Tensor) -> tuple[float, int]:
        logits = model.module(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss.item(), targets.numel()

    results, timing = timed_batches(negative_log_likelihood, batches, [b.numel() for b in batches])
    total_nll = sum(nll for nll, _ in results)
    predicted = sum(n for _, n in results)
    measurable = hasattr(model.module, "generate") and len(ids) >= PREFILL_TOKENS
    speed = causal_lm_speed(model.module, ids, options.compiled_decode) if measurable else {}
    return {
        "perplexity": round(math.exp(total_nll / predicted), 4),
        "data": data,
        "tokens": usable,
        "leading_special_tokens": first,
        "windows": len(batches),
        "tokens_per_s": timing["items_per_s"],
        "seconds": timing["seconds"],
        "threads": timing["threads"],
        **speed,
    }
