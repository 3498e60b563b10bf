#!/usr/bin/env python
"""One peer quantizer's row of scripts/bench_quality.py, run inside that peer's own virtual environment.

    <peer venv>/bin/python scripts/quality_probe.py ROW.json     # prints one JSON line

ROW.json gives the peer (`hqq`, `nncf`, `torchao`, `llmcompressor` or `llama`), its recipe, the fp32 SmolLM2 directory (and,
for llama.cpp, the GGUF of the same weights), and the token-id windows of every corpus (and of calibration)
exactly as krunch's perplexity evaluation cuts them, so each peer is scored on the same tokens. Imports
nothing of krunch: the peer's environment does not have it.
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


def torchao_model(model: torch.nn.Module, recipe: dict[str, Any]) -> tuple[torch.nn.Module, int]:
    """torchao's int4 weight-only CPU layout on the decoder linears of the bf16 model, as torchao runs on CPU;
    the weight bytes: int4 codes plus a bf16 scale and zero per group, the rest in bf16."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = model.to(torch.bfloat16)
    group = recipe["group_size"]
    decoder = {name for name, module in model.named_modules() if name.startswith(DECODER) and isinstance(module, torch.nn.Linear)}
    quantized = sum(model.get_submodule(name).weight.numel() for name in decoder)
    others = [t for key, t in model.state_dict().items() if key.rpartition(".")[0] not in decoder]
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False),
              filter_fn=lambda module, name: name in decoder)  # fmt: skip
    return model, quantized // 2 + quantized // group * 4 + distinct_bytes(others)


def llmcompressor_model(model: torch.nn.Module, recipe: dict[str, Any], calibration: list[list[int]]) -> tuple[torch.nn.Module, int]:
    """llm-compressor's GPTQ (`oneshot` with a GPTQModifier: int weights in symmetric groups, 16-bit activations,
    the W4A16 scheme at the recipe's group size) on the decoder linears, calibrated on the given windows; the LM
    head (tied to the embedding) stays fp32. After `oneshot` the model runs its weights quantize-dequantized, so
    its perplexity is the quantized model's; the bytes count the codes, one 16-bit scale per group and the rest."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits, group = recipe["bits"], recipe["group_size"]
    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}
    dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(ids) for ids in calibration]})
    decoder = {name for name, module in model.named_modules() if name.startswith(DECODER) and isinstance(module, torch.nn.Linear)}
    quantized = sum(model.get_submodule(name).weight.numel() for name in decoder)
    others = [t for key, t in model.state_dict().items() if key.rpartition(".")[0] not in decoder]
    oneshot(model=model, dataset=dataset, recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
            max_seq_length=max(len(ids) for ids in calibration), num_calibration_samples=len(calibration))  # fmt: skip
    return model, quantized * bits // 8 + quantized // group * 2 + distinct_bytes(others)


def llama_perplexity(gguf: str, windows: list[list[int]], threads: int) -> float:
    """Perplexity through llama-cpp-python on the given token ids: each window evaluated from an empty cache,
    every position's logits kept."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=max(len(w) for w in windows), n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)  # fmt: skip
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return math.exp(total / count)


def main() -> int:
    row = json.loads(open(sys.argv[1], encoding="utf-8").read())
    torch.set_num_threads(row.get("threads", torch.get_num_threads()))
    if row["peer"] == "llama":  # the GGUF file is the model: its bytes are the weights'
        from pathlib import Path

        fp32_bytes = sum(path.stat().st_size for path in Path(row["model_dir"]).glob("*.safetensors"))
        started = time.perf_counter()
        scores = {corpus: llama_perplexity(row["gguf"], windows, row["threads"]) for corpus, windows in row["windows"].items()}
        print(json.dumps({"perplexity": scores, "bytes": Path(row["gguf"]).stat().st_size, "fp32_bytes": fp32_bytes,
                          "seconds": time.perf_counter() - started}))  # fmt: skip
        return 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(row["model_dir"], dtype=torch.float32).eval()
    fp32_bytes = distinct_bytes(list(model.state_dict().values()))
    started = time.perf_counter()
    if row["peer"] == "hqq":
        size = hqq_model(model, row["recipe"])
    elif row["peer"] == "nncf":
        model, size = nncf_model(model, row["recipe"], row["calibration"])
    elif row["peer"] == "torchao":
        model, size = torchao_model(model, row["recipe"])
    elif row["peer"] == "llmcompressor":
        model, size = llmcompressor_model(model, row["recipe"], row["calibration"])
    else:
        raise SystemExit(f"unknown peer {row['peer']!r}")
    seconds = time.perf_counter() - started
    scores = {corpus: perplexity(model, windows) for corpus, windows in row["windows"].items()}
    print(json.dumps({"perplexity": scores, "bytes": size, "fp32_bytes": fp32_bytes, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
