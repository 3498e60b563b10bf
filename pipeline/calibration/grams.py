"""Calibration statistics: the Gram matrix X^T X of each selected layer's inputs (a Linear's input vectors,
a Conv2d's input patches), from held-out data.

Text models read the calibration half of the corpus (never the evaluation
half); vision models get photo crops drawn with a different seed than the
evaluation set, or words from the other half of the vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from krunch.data.text import Split, special_tokens, token_slice
from krunch.model import LoadedModel, ModelKind
from krunch.spec import Calibration

# (tokens per sequence, sequences per batch), taken in turn. Sentence embedders see sentences and documents:
# windows of one length only fit the layers to that length (256-token windows alone: MiniLM's feed-forward
# layers at half their parameters kept 0.79 cosine to fp32 on short sentences; 32-token windows alone: 0.83, but
# Lee-50 on its long documents fell from 0.66 to 0.61).
WINDOWS = {ModelKind.CAUSAL_LM: ((512, 1),), ModelKind.SENTENCE_EMBEDDING: ((32, 16), (64, 8), (128, 4), (256, 2))}
ROWS_CHUNK = 4  # batch items whose input rows are formed at once: a conv's patches repeat each pixel kh*kw times
Batch = tuple[tuple, dict]  # (args, kwargs) for a model's (or a block's) forward


def _special_tokens(model: LoadedModel) -> tuple[list[int], list[int]]:
    """The ids the model's tokenizer puts around every input (a causal LM's BOS, an encoder's [CLS] ... [SEP]):
    attention leans on them, so calibration windows without them show layers inputs they never see in use.
    A causal LM's windows take only the leading ones (a window is a stretch of running text)."""
    first, last = special_tokens(model.tokenizer)
    return (first, []) if model.kind is ModelKind.CAUSAL_LM else (first, last)


def text_batches(model: LoadedModel, data: str, split: Split, tokens: int) -> Iterator[Batch]:
    """Batches of the model kind's WINDOWS, taken in turn, from the first `tokens` tokens of `split`: each
    token once, the encoder's special tokens around every window."""
    first, last = _special_tokens(model)
    ids = token_slice(model.tokenizer, data, split, tokens)
    shapes, start = WINDOWS[model.kind], 0
    for index in itertools.count():
        length, rows = shapes[index % len(shapes)]
        text = length - len(first) - len(last)
        rows = min(rows, (len(ids) - start) // text)  # the last batch may be shorter
        if rows == 0:
            return
        chunk = torch.tensor([first + ids[start + row * text : start + (row + 1) * text] + last for row in range(rows)])
        start += rows * text
        yield (), {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}


def calibration_batches(model: LoadedModel, calibration: Calibration) -> Iterator[Batch]:
    """(args, kwargs) for model.module, one batch at a time: the caller's own inputs when it gave some."""
    if model.calibration_inputs is not None:
        yield from model.calibration_inputs
    elif model.kind in WINDOWS:
        yield from text_batches(model, calibration.data, Split.CALIBRATION, calibration.tokens)
    elif model.kind is ModelKind.IMAGE_CLASSIFIER:
        from krunch.data.images import photo_crops

        crops = photo_crops(crops_per_photo=max(1, calibration.items // 10), seed=1)[: calibration.items]
        tensors = torch.stack([model.preprocess(crop) for crop in crops])
        for start in range(0, len(tensors), 16):
            yield (tensors[start : start + 16],), {}
    elif model.kind is ModelKind.TEXT_RECOGNIZER:
        from krunch.data.ocr_words import word_images
        from krunch.evaluation.ocr import pad_right_replicating

        images = word_images(model.charset, count=calibration.items, split=Split.CALIBRATION)
        for start in range(0, len(images), 16):
            yield (pad_right_replicating([model.preprocess(w.image) for w in images[start : start + 16]]),), {}
    else:
        raise ValueError(f"{model.reference}: calibration needs a model kind krunch knows how to feed")


def input_rows(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """What the layer multiplies its weight by, one row each: a Linear's input vectors, a Conv2d's input patches
    (channel-major, in the order of weight.reshape(out, -1))."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(tensor, module.kernel_size, module.dilation, module.padding, module.stride)  # (n, c*kh*kw, places)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])


def _product(rows: torch.Tensor) -> torch.Tensor:
    x = rows.float()
    return (x.T @ x).double()


@contextmanager
def recording_grams(layers: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, every call of a named Linear or Conv2d adds X^T X (float64) of its inputs to grams[name]."""
    # Linears fed the very same tensor (gate_proj and up_proj) share one product; holding the tensor
    # in `previous` keeps its memory from being reused, so identity cannot be confused with an address.
    previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            tensor = inputs[0]
            cached = previous.get("last")
            if cached is not None and cached[0] is tensor:
                product = cached[1]
            elif isinstance(module, nn.Conv2d):
                product = sum(_product(input_rows(module, part)) for part in tensor.detach().split(ROWS_CHUNK))
            else:
                product = _product(input_rows(module, tensor.detach()))
                previous["last"] = (tensor, product)
            grams[name] = grams[name] + product if name in grams else product.clone()

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        yield
    finally:
        previous.clear()
        for handle in handles:
            handle.remove()


class _AllSeen(Exception):  # noqa: N818 - control flow, not an error
    """Raised once every named layer has had its input on a pass that need not go further."""


def collect_grams(model: LoadedModel, names: list[str], calibration: Calibration, stop_when_seen: bool = False) -> dict[str, torch.Tensor]:
    """Accumulate X^T X (float64) over the calibration data for each named Linear or Conv2d. `stop_when_seen`: end
    each forward once every named layer has been called (a streamed model's LM head then never computes a batch's
    logits over the whole vocabulary: 311 MB for Qwen2.5's 151,936 rows); only for layers called once per forward."""
    grams: dict[str, torch.Tensor] = {}
    layers = {name: model.module.get_submodule(name) for name in names}
    seen: set[str] = set()

    def stop(name: str):  # by name: a streamed unit runs a copy of its modules, hooks included
        def after_recording(_module: nn.Module, _inputs: tuple) -> None:
            seen.add(name)
            if seen.issuperset(layers):
                raise _AllSeen

        return after_recording

    handles = []
    try:
        with recording_grams(layers, grams), torch.inference_mode():
            if stop_when_seen:  # after the recording hooks: a layer's input is recorded before the pass ends
                handles = [layer.register_forward_pre_hook(stop(name)) for name, layer in layers.items()]
            for args, kwargs in tqdm(list(calibration_batches(model, calibration)), desc="calibration", unit="batch", leave=False):
                seen.clear()
                try:
                    model.module(*args, **kwargs)
                except _AllSeen:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return grams
