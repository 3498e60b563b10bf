"""Perplexity of a causal LM on a fixed slice of held-out text, in non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from krunch.data.text import Split, special_tokens, token_slice
from krunch.errors import KrunchError
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, evaluator
from krunch.evaluation.speed import PREFILL_TOKENS, causal_lm_speed
from krunch.evaluation.timing import timed_batches
from krunch.model import LoadedModel, ModelKind

DEFAULT_DATA = "wikipedia"
# Positions whose logits exist at once: 128 x 49152 fp32 logits are 25 MB, a 512-token window's 100 MB. A streamed
# head bigger than a block cuts the vocabulary instead (`vocabulary_run_nll`).
HEAD_POSITIONS = 128


def token_windows(tokenizer, ids: list[int], window: int) -> list[list[int]]:
    """`ids` cut into non-overlapping windows of `window` tokens, each led by the tokenizer's own leading special
    tokens (a BOS model reads its BOS first, as in use); a partial last window is dropped. Peers in the
    benchmarks are scored on these very windows."""
    first, _ = special_tokens(tokenizer)
    text = window - len(first)
    return [first + ids[start : start + text] for start in range(0, len(ids) // text * text, text)]


def _head_split(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder and LM head of a transformers causal LM whose logits are the head applied to the decoder's
    output and nothing else (no soft-capping or scaling of logits); None for any other model."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    decoder = getattr(module, "get_decoder", lambda: None)()
    head = getattr(module, "get_output_embeddings", lambda: None)()
    return None if decoder is None or head is None else (decoder, head)


def window_nll(module: torch.nn.Module, batch: torch.Tensor, positions: int = HEAD_POSITIONS) -> float:
    """Summed negative log-likelihood of each next token of a window, with the LM head applied `positions`
    positions at a time where the model allows it (its logits dominate an evaluation's memory otherwise)."""
    targets = batch[:, 1:]
    split = _head_split(module)
    if split is None:
        logits = module(input_ids=batch).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    decoder, head = split
    hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    vocabulary_runs = getattr(head.forward, "logit_runs", None)  # a streamed head, read a run of rows at a time
    if vocabulary_runs is not None:
        return vocabulary_run_nll(vocabulary_runs(hidden), targets)
    total = 0.0
    for start in range(0, hidden.shape[1], positions):
        logits = head(hidden[:, start : start + positions]).float()
        chunk = targets[:, start : start + positions]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk.reshape(-1), reduction="sum").item()
    return total


def vocabulary_run_nll(runs: Iterator[tuple[int, torch.Tensor]], targets: torch.Tensor) -> float:
    """Summed NLL from the logits of consecutive runs of the vocabulary (each run's first token id and logits): a
    running log-sum-exp and the targets' own logits, so a head streamed from its file is read once per window
    and its full logits never exist at once."""
    log_total: torch.Tensor | None = None
    target_logits = torch.zeros(targets.shape, dtype=torch.float32)
    for start, logits in runs:
        logits = logits.float()
        stop = start + logits.shape[-1]
        run_lse = torch.logsumexp(logits, dim=-1)
        log_total = run_lse if log_total is None else torch.logaddexp(log_total, run_lse)
        inside = (targets >= start) & (targets < stop)
        local = (targets - start).clamp(0, logits.shape[-1] - 1)
        target_logits = torch.where(inside, logits.gather(-1, local.unsqueeze(-1)).squeeze(-1), target_logits)
    assert log_total is not None, "an LM head with no rows"
    return (log_total - target_logits).sum().item()


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
        return window_nll(model.module, batch), batch.shape[1] - 1

    results, timing = timed_batches(negative_log_likelihood, batches, [b.numel() for b in batches], warm_up=not options.streamed,
                                    progress="perplexity (streamed)" if options.streamed else None)  # fmt: skip
    total_nll = sum(nll for nll, _ in results)
    predicted = sum(n for _, n in results)
    measurable = not options.streamed and hasattr(model.module, "generate") and len(ids) >= PREFILL_TOKENS
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
