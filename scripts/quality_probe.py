#!/usr/bin/env python
"""One peer quantizer's row of scripts/bench_quality.py, run inside that peer's own virtual environment.

    <peer venv>/bin/python scripts/quality_probe.py ROW.json     # prints one JSON line

ROW.json gives the peer (`hqq` or `nncf`), its recipe, the fp32 SmolLM2 directory, and the token-id windows
of every corpus (and of calibration) exactly as krunch's perplexity evaluation cuts them, so each peer is
scored on the same tokens. Imports nothing of krunch: the peer's environment does not have it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

DECODER = "model.layers."


def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            batch = torch.tensor([window])
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def distinct_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def hqq_model(model: torch.nn.Module, recipe: dict[str, Any]) -> int:
    """Every decoder Linear as an HQQLinear (half-quadratic fit of scale and zero point, data-free); returns the
    weight bytes, the scales and zero points counted in fp16 as HQQ stores them for inference."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=recipe["bits"], group_size=recipe["group_size"])
    quantized_bytes, replaced = 0, set()
    for name, module in list(model.named_modules()):
        if name.startswith(DECODER) and isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            layer = HQQLinear(module, quant_config=config, compute_dtype=torch.float32, device="cpu")
            setattr(model.get_submodule(parent), child, layer)
            meta = layer.meta
            quantized_bytes += layer.W_q.numel() * layer.W_q.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
            replaced.add(name)
    others = [t for key, t in model.state_dict().items() if key.rpartition(".")[0] not in replaced]
    return quantized_bytes + distinct_bytes([t for t in others if isinstance(t, torch.Tensor)])


def nncf_model(model: torch.nn.Module, recipe: dict[str, Any], calibration: list[list[int]]) -> tuple[torch.nn.Module, int]:
    """nncf.compress_weights on the torch model: INT4 in groups on the decoder linears, the embedding / LM head in
    its 8-bit backup mode; data-aware (AWQ + scale estimation) when the recipe says so."""
    import nncf

    dataset = nncf.Dataset(calibration, lambda ids: {"input_ids": torch.tensor([ids])})
    aware = recipe.get("awq", False)
    mode = getattr(nncf.CompressWeightsMode, recipe["mode"])
    compressed = nncf.compress_weights(model, mode=mode, group_size=recipe["group_size"], ratio=1.0, dataset=dataset,
                                       awq=aware, scale_estimation=aware)  # fmt: skip
    return compressed, distinct_bytes([t for t in compressed.state_dict().values() if isinstance(t, torch.Tensor)])


def main() -> int:
    row = json.loads(open(sys.argv[1], encoding="utf-8").read())
    torch.set_num_threads(row.get("threads", torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(row["model_dir"], dtype=torch.float32).eval()
    fp32_bytes = distinct_bytes(list(model.state_dict().values()))
    started = time.perf_counter()
    if row["peer"] == "hqq":
        size = hqq_model(model, row["recipe"])
    elif row["peer"] == "nncf":
        model, size = nncf_model(model, row["recipe"], row["calibration"])
    else:
        raise SystemExit(f"unknown peer {row['peer']!r}")
    seconds = time.perf_counter() - started
    scores = {corpus: perplexity(model, windows) for corpus, windows in row["windows"].items()}
    print(json.dumps({"perplexity": scores, "bytes": size, "fp32_bytes": fp32_bytes, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
