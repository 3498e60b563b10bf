#!/usr/bin/env python
"""Quality against size: krunch's methods next to fp32, torch's dynamic int8 and plain SVD, one table per model.

Every row is a real compression job run through the pipeline (`run_compression`,
layers in this process) and evaluated on held-out data against the fp32 model
in the same run; speed is a ratio to the fp32 model measured in the same job.
Columns: the selected layers' parameters after, weight bytes vs fp32 and vs
fp16, the quality metric and its change, throughput speedup, compression time.

    .venv/bin/python scripts/bench_quality.py [--models smollm2-135m,minilm-l6] [--json F] [--plot PNG]  # default: all four
    python scripts/bench_quality.py --full        # every row (healing, TT, more ratios): hours on 2 CPUs
    scripts/bench_peers.sh    # once: SmolLM2's peer rows (HQQ, NNCF, torchao, llama.cpp; each skipped until set up)

SmolLM2's rows also give perplexity on held-out news articles (`news`, which no row
calibrates on) and bits per weight of the whole model (scales and zero points
included); its peer quantizers (HQQ, NNCF, torchao, and llama.cpp's own GGUF
types of the same weights through llama-cpp-python) run in their own venvs through
scripts/quality_probe.py on the very token windows krunch is scored on.

Measured on a 2-core machine (summed row times): all four models about 32 minutes
(SmolLM2-135M 17.5, MiniLM 5.5, EasyOCR 8); the healing rows --full adds take 34 more
(SmolLM2's alone 15). Each job also evaluates its fp32 baseline, so every speedup
is a ratio within one job.
--json merges into the file: tables of models not run this time stay, and with
--rows only the rows run are replaced; --plot draws every table the file then holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from krunch.cli import write_json  # noqa: E402
from krunch.run import evaluation_task, load_source, run_compression  # noqa: E402
from krunch.execution.executors import InProcessExecutor  # noqa: E402
from krunch.evaluation import EvalOptions, evaluate  # noqa: E402
from krunch.model import LoadedModel  # noqa: E402
from krunch.sizes import weight_bytes  # noqa: E402
from krunch.spec import Task, parse_job  # noqa: E402

# model -> (layers the recipes select, evaluation section, speed key); the metric is the task's primary one
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"match": "model.layers.*", "evaluation": {"task": "perplexity", "data": "wikipedia", "tokens": 4096},
                     "speed": "tokens_per_s", "note": "weights come from a 4-bit GGUF", "held_out": "news"},
    "minilm-l6": {"match": "encoder.layer.*", "evaluation": {"task": "embedding"}, "speed": "documents_per_s", "note": "", "secondary": "fidelity_mean_cosine"},
    # convolutional models get their own rows only (EXTRA_ROWS): the generic rows factorise Linears
    "easyocr-g2": {"match": None, "evaluation": {"task": "ocr", "items": 1000},
                   "speed": "words_per_s", "note": "1000 rendered news words"},
    "mobilenet-v2": {"match": None, "evaluation": {"task": "image-agreement"},
                     "speed": "images_per_s", "note": "agreement with the fp32 model's top-1"},
}  # fmt: skip
for _info in MODELS.values():
    _info["metric"], _info["higher_better"] = Task(_info["evaluation"]["task"]).primary_metric
CALIBRATION = {"data": "wikipedia", "tokens": 8192}
PROPAGATED = {**CALIBRATION, "propagate": True}
GPTQ = {"rounding": "gptq"}  # fed by error propagation: with the original model's Grams SmolLM2 int4 g64 got worse (36.1 vs 33.2)
INT4_GPTQ = {"bits": 4, **GPTQ}
INT4_FITTED = {"bits": 4, "groupSize": 64, "symmetric": False, "grid": "fitted"}
# SmolLM2's tied embedding / LM head (21% of its parameters) quantized too: the whole model at 4-5 bits
EMBEDDING_INT8 = [{"match": name, "method": "none", "quantize": {"bits": 8, "grid": "fitted"}} for name in ("model.embed_tokens", "lm_head")]
def LQER(rank: int) -> dict[str, Any]:  # noqa: N802  (a rule, read as a constant)
    return {"match": "model.layers.*", "method": "lqer", "rank": {"fixed": rank}, "activationAware": True}


SVD_DECODER = {"match": "model.layers.*", "method": "svd"}  # under a bytes budget: each layer dense or factorised, at any width
EMBEDDING_INT4 = [{"match": name, "method": "none", "quantize": INT4_FITTED} for name in ("model.embed_tokens", "lm_head")]
HEAL = {"steps": 100, "tokens": 16384, "lr": 2e-5}  # about 5 s a step for SmolLM2 on 2 CPU cores
# EasyOCR's first conv (1 input channel) and last (2x2) stay dense, as in examples/easyocr-tucker.yaml
OCR_CONVS = [{"match": "FeatureExtraction.ConvNet.0", "method": "none"}, {"match": "FeatureExtraction.ConvNet.18", "method": "none"}]
OCR_TUCKER = {"match": "FeatureExtraction.ConvNet.*", "method": "tucker"}
OCR_AWARE_TUCKER = {**OCR_TUCKER, "activationAware": True}
OCR_PROPAGATED = {"items": 512, "propagate": True}
# Kernel-only Tucker healed: 100 steps on 512 words 0.961, 400 steps on 2048 words 0.975 (3e-4: 0.961)
OCR_HEAL = {"steps": 400, "items": 2048, "lr": 1e-4}
# MiniLM's feed-forward layers alone (the issue's target: paramRatio 0.5); '?' keeps attention.output out
MINILM_FFN = [{"match": f"encoder.layer.{layer}", "method": "svd", "activationAware": True}
              for layer in ("*.intermediate.dense", "?.output.dense")]  # fmt: skip
EXTRA_ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "smollm2-135m": {
        "int4 g64 fitted (data-free)": {"rules": [{"match": "model.layers.*", "method": "none"}], "quantize": INT4_FITTED},
        "int4 g64 fitted to inputs": {"rules": [{"match": "model.layers.*", "method": "none"}], "quantize": INT4_FITTED,
                                      "calibration": CALIBRATION},
        "int4 g64 gptq, fitted grid": {"rules": [{"match": "model.layers.*", "method": "none"}], "quantize": {**INT4_FITTED, **GPTQ},
                                       "calibration": PROPAGATED},
        "int4 g64 gptq fitted + int8 emb/head": {"rules": EMBEDDING_INT8 + [{"match": "model.layers.*", "method": "none"}],
                                                 "quantize": {**INT4_FITTED, **GPTQ}, "calibration": PROPAGATED},
        "int4 g64 fitted everywhere": {"rules": EMBEDDING_INT4 + [{"match": "model.layers.*", "method": "none"}],
                                       "quantize": INT4_FITTED, "calibration": CALIBRATION},
        "int3 g64 fitted to inputs": {"rules": [{"match": "model.layers.*", "method": "none"}], "quantize": {**INT4_FITTED, "bits": 3},
                                      "calibration": CALIBRATION},
        "int3 g128 gptq, fitted grid": {"rules": [{"match": "model.layers.*", "method": "none"}],
                                        "quantize": {**INT4_FITTED, **GPTQ, "bits": 3, "groupSize": 128}, "calibration": PROPAGATED},
        "joint budget int8-int2, bytes 0.1, gptq fitted": {"target": {"bytesRatio": 0.1, "bits": [8, 4, 3, 2]}, "rules": [SVD_DECODER],
                                                           "quantize": {**INT4_FITTED, **GPTQ}, "calibration": PROPAGATED},
        "joint budget int8-int2, bytes 0.078, gptq fitted": {"target": {"bytesRatio": 0.078, "bits": [8, 4, 3, 2]}, "rules": [SVD_DECODER],
                                                             "quantize": {**INT4_FITTED, **GPTQ}, "calibration": PROPAGATED},
        "int3 g64 + rank-16 int8 branch (lqer)": {"rules": [LQER(16)], "quantize": {**INT4_FITTED, "bits": 3}, "calibration": CALIBRATION},
        "int2 g64 + rank-32 int8 branch (lqer)": {"rules": [LQER(32)], "quantize": {**INT4_FITTED, "bits": 2}, "calibration": CALIBRATION},
    },
    "minilm-l6": {
        "int4 g64 fitted to inputs": {"rules": [{"match": "encoder.layer.*", "method": "none"}], "quantize": INT4_FITTED,
                                      "calibration": CALIBRATION},
        "int4 g64 gptq, fitted grid": {"rules": [{"match": "encoder.layer.*", "method": "none"}], "quantize": {**INT4_FITTED, **GPTQ},
                                       "calibration": PROPAGATED},
        "FFN whitened SVD, params 0.5": {"target": {"paramRatio": 0.5}, "rules": MINILM_FFN, "calibration": CALIBRATION},
        "FFN propagated SVD, params 0.5": {"target": {"paramRatio": 0.5}, "rules": MINILM_FFN, "calibration": PROPAGATED},
    },
    "easyocr-g2": {
        "krunch int8": {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}},
        "Tucker convs, params 0.5": {"target": {"paramRatio": 0.5}, "rules": OCR_CONVS + [OCR_TUCKER]},
        "activation-aware Tucker convs 0.5": {"target": {"paramRatio": 0.5}, "rules": OCR_CONVS + [OCR_AWARE_TUCKER], "calibration": {"items": 512}},
        "propagated activation-aware Tucker 0.5": {"target": {"paramRatio": 0.5}, "rules": OCR_CONVS + [OCR_AWARE_TUCKER],
                                                   "calibration": OCR_PROPAGATED},
        "CP convs, rank 64": {"rules": OCR_CONVS + [{"match": "FeatureExtraction.ConvNet.*", "method": "cp", "rank": {"fixed": 64}}]},
    },
    "mobilenet-v2": {
        "krunch int8": {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}},
        "krunch int8 (groups of 32)": {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8, "groupSize": 32}},
        "krunch int4 (g32), int8 first/last": {"rules": [{"match": "features.0.*", "method": "none", "quantize": {"bits": 8}},
                                                      {"match": "classifier.*", "method": "none", "quantize": {"bits": 8}},
                                                      {"match": "*", "method": "none"}], "quantize": {"bits": 4, "groupSize": 32}},
    },
}  # fmt: skip

# Healing rows of the model-specific recipes, under --full (with the generic ones, about 34 minutes on 2 cores)
FULL_EXTRA_ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "minilm-l6": {
        "FFN propagated SVD 0.5 + heal": {"target": {"paramRatio": 0.5}, "rules": MINILM_FFN, "calibration": PROPAGATED, "heal": HEAL},
    },
    "easyocr-g2": {
        "Tucker convs 0.5 + heal": {"target": {"paramRatio": 0.5}, "rules": OCR_CONVS + [OCR_TUCKER], "heal": OCR_HEAL},
        "propagated activation-aware Tucker 0.5 + heal": {"target": {"paramRatio": 0.5}, "rules": OCR_CONVS + [OCR_AWARE_TUCKER],
                                                          "calibration": OCR_PROPAGATED, "heal": OCR_HEAL},
    },
}  # fmt: skip


# Peer quantizers of SmolLM2, each run by scripts/quality_probe.py in its own venv (scripts/bench_peers.sh NAME):
# all 210 decoder linears at 4 bits in groups of 64 (llama.cpp: its whole-model types, the embedding and head
# included, Q4_K_M and Q3_K_M mixing in wider types where its rules say), on the same evaluation windows; data-aware peers calibrated on
# 8,192 tokens of the calibration half, as krunch's rows are
PEERS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "smollm2-135m": {
        "HQQ 0.2.8 int4 g64 (data-free)": ("hqq", {"bits": 4, "group_size": 64}),
        "NNCF 3.4 INT4_SYM g64 (data-free)": ("nncf", {"mode": "INT4_SYM", "group_size": 64}),
        "NNCF 3.4 INT4_SYM g64, AWQ + scale est.": ("nncf", {"mode": "INT4_SYM", "group_size": 64, "awq": True}),
        "torchao 0.18 int4 weight-only g64 (bf16)": ("torchao", {"group_size": 64}),
        "llm-compressor 0.14 GPTQ W4A16 g64": ("llmcompressor", {"bits": 4, "group_size": 64}),
        "llama.cpp Q4_0 (whole model)": ("llama", {"type": "Q4_0"}),
        "llama.cpp Q4_K_M (whole model)": ("llama", {"type": "Q4_K_M"}),
        "llama.cpp Q3_K_M (whole model)": ("llama", {"type": "Q3_K_M"}),
    },
}
PEER_CALIBRATION_TOKENS = 8192
PROBE = ROOT / "scripts" / "quality_probe.py"


def rows_for(match: str, full: bool) -> dict[str, dict[str, Any]]:
    """Row name -> recipe. The default set answers the issue's targets without healing; --full adds healing,
    TT and more ratios."""
    svd = {"match": match, "method": "svd"}
    aware = {**svd, "activationAware": True}
    rows = {
        "krunch int8": {"rules": [{"match": match, "method": "none"}], "quantize": {"bits": 8}},
        "krunch int4 (g64)": {"rules": [{"match": match, "method": "none"}], "quantize": {"bits": 4, "groupSize": 64}},
        "krunch int4 (g64), gptq": {"rules": [{"match": match, "method": "none"}], "quantize": {**INT4_GPTQ, "groupSize": 64},
                                    "calibration": PROPAGATED},
        "plain SVD, params 0.9": {"target": {"paramRatio": 0.9}, "rules": [svd]},
        "whitened SVD, params 0.9": {"target": {"paramRatio": 0.9}, "rules": [aware], "calibration": CALIBRATION},
        "propagated SVD, params 0.9": {"target": {"paramRatio": 0.9}, "rules": [aware], "calibration": PROPAGATED},
        "joint budget, bytes 0.25": {"target": {"bytesRatio": 0.25}, "rules": [svd]},
        "joint budget, bytes 0.2, gptq": {"target": {"bytesRatio": 0.2}, "rules": [svd], "quantize": GPTQ, "calibration": PROPAGATED},
    }
    if full:
        rows["propagated SVD 0.9 + heal"] = {"target": {"paramRatio": 0.9}, "rules": [aware], "calibration": PROPAGATED, "heal": HEAL}
        for ratio in (0.8, 0.7):
            rows[f"plain SVD, params {ratio}"] = {"target": {"paramRatio": ratio}, "rules": [svd]}
            rows[f"whitened SVD, params {ratio}"] = {"target": {"paramRatio": ratio}, "rules": [aware], "calibration": CALIBRATION}
            rows[f"propagated SVD, params {ratio}"] = {"target": {"paramRatio": ratio}, "rules": [aware], "calibration": PROPAGATED}
        rows["whitened SVD 0.9 + heal"] = {"target": {"paramRatio": 0.9}, "rules": [aware], "calibration": CALIBRATION, "heal": HEAL}
        rows["TT, params 0.9"] = {"target": {"paramRatio": 0.9}, "rules": [{"match": match, "method": "tt"}]}
        rows["joint budget, bytes 0.2"] = {"target": {"bytesRatio": 0.2}, "rules": [svd]}
        rows["joint budget, bytes 0.15"] = {"target": {"bytesRatio": 0.15}, "rules": [svd]}
        rows["joint budget, bytes 0.15, gptq"] = {"target": {"bytesRatio": 0.15}, "rules": [svd], "quantize": GPTQ, "calibration": PROPAGATED}
    return rows


def job_for(model: str, name: str, recipe: dict[str, Any]) -> Any:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": name},
                      "spec": {"model": {"source": f"zoo:{model}"}, "recipe": recipe, "evaluation": MODELS[model]["evaluation"]}})  # fmt: skip


def held_out_metric(model: str, loaded: LoadedModel) -> float | None:
    """The primary metric on the model's second corpus, which no row calibrates on (None: the model has none)."""
    info = MODELS[model]
    if "held_out" not in info:
        return None
    options = EvalOptions(data=info["held_out"], tokens=info["evaluation"]["tokens"])
    return evaluate(loaded, Task(info["evaluation"]["task"]), options)[info["metric"]]


def krunch_row(model: str, name: str, recipe: dict[str, Any], scratch: Path) -> dict[str, Any]:
    started = time.perf_counter()
    result = run_compression(job_for(model, "bench", recipe), scratch / name.replace(" ", "_").replace("/", "-"), executor=InProcessExecutor())
    report = result.report
    info = MODELS[model]
    before, after = report["metrics_before"], report["metrics_after"]
    return {"held_out_after": held_out_metric(model, result.model), "bits_per_weight": 32 * report["bytes_after"] / report["bytes_before"],
        "row": name, "params_after": report["selected_params_after"], "params_before": report["selected_params_before"],
        "bytes_vs_fp32": report["bytes_after"] / report["bytes_before"], "bytes_vs_fp16": report["bytes_after"] / (report["bytes_before"] / 2),
        "metric_before": before[info["metric"]], "metric_after": after[info["metric"]],
        "speedup": after[info["speed"]] / before[info["speed"]], "secondary": after.get(info.get("secondary", "")),
        "compression_s": report["timings"]["total_s"] - report["timings"].get("evaluate_s", 0), "wall_s": time.perf_counter() - started,
        "target": report.get("target"), "heal": {k: v for k, v in report.get("heal", {}).items() if k != "losses"} or None,
    }  # fmt: skip


def dynamic_int8_bytes(module: torch.nn.Module) -> int:
    """What torch's dynamically quantized model stores: each quantized Linear's int8 weight, its scale and zero
    point and fp32 bias; every other tensor as it is (a tie to a quantized Linear's weight is broken by the
    quantization, so the embedding it shared stays fp32 beside the int8 copy)."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        if isinstance(sub, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = sub._weight_bias()
            total += weight.numel() * weight.element_size() + 16 + (bias.numel() * bias.element_size() if bias is not None else 0)
            continue
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def torch_dynamic_row(model: str) -> dict[str, Any]:
    """torch.ao's one-liner: int8 weights and int8 activations (what most users reach for first)."""
    job = job_for(model, "bench", {"rules": [{"match": MODELS[model]["match"] or "*", "method": "none"}]})
    original = load_source(job)
    task = evaluation_task(job, original)
    options = EvalOptions(**{k: v for k, v in MODELS[model]["evaluation"].items() if k in ("data", "tokens", "items")})
    started = time.perf_counter()
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(original.module), {torch.nn.Linear}, dtype=torch.qint8)
    seconds = time.perf_counter() - started
    before = evaluate(original, task, options)
    after = evaluate(LoadedModel("torch-dynamic-int8", quantized, original.kind, original.tokenizer, original.preprocess,
                                 original.charset, dict(original.metadata)), task, options, reference=original)  # fmt: skip
    info = MODELS[model]
    size = dynamic_int8_bytes(quantized) / weight_bytes(original.module)
    held_out = {"held_out_before": held_out_metric(model, original), "bits_per_weight": 32 * size,
                "held_out_after": held_out_metric(model, LoadedModel("torch-dynamic-int8", quantized, original.kind, original.tokenizer))}
    return {**held_out, "row": "torch quantize_dynamic int8", "params_after": None, "params_before": None, "bytes_vs_fp32": size,
            "bytes_vs_fp16": 2 * size, "metric_before": before[info["metric"]], "metric_after": after[info["metric"]],
            "speedup": after[info["speed"]] / before[info["speed"]], "secondary": after.get(info.get("secondary", "")),
            "compression_s": seconds, "wall_s": None, "target": None}  # fmt: skip


def peer_python(peer: str) -> str | None:
    """The peer's python from scripts/bench_peers.sh, if it has been set up (nothing is installed here)."""
    root = Path(os.environ.get("KRUNCH_BENCH_PEERS", Path.home() / ".cache" / "krunch" / "bench-peers"))
    python = root / peer / "bin" / "python"
    return str(python) if python.exists() and any((root / peer).glob(".installed-*")) else None


def peer_row(model: str, name: str, peer: str, recipe: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any] | None:
    """A peer quantizer's row, scored on the very windows krunch's evaluation cuts (None: the peer is not set up)."""
    from krunch.data.text import Split, token_slice
    from krunch.evaluation.perplexity import token_windows
    from krunch.zoo import load_zoo_model
    from krunch.zoo.smollm2 import cached_directory

    python = peer_python(peer)
    if python is None:
        print(f"  {model}: {name}: skipped ({peer} not set up: scripts/bench_peers.sh {peer})", flush=True)
        return None
    info = MODELS[model]
    tokenizer = load_zoo_model(model).tokenizer
    corpora = {"main": info["evaluation"]["data"], "held_out": info["held_out"]}
    windows = {key: token_windows(tokenizer, token_slice(tokenizer, data, Split.EVALUATION, info["evaluation"]["tokens"]), 512)
               for key, data in corpora.items()}  # fmt: skip
    calibration = token_windows(tokenizer, token_slice(tokenizer, CALIBRATION["data"], Split.CALIBRATION, PEER_CALIBRATION_TOKENS), 512)
    job = {"peer": peer, "recipe": recipe, "model_dir": str(cached_directory()), "windows": windows, "calibration": calibration,
           "threads": torch.get_num_threads()}  # fmt: skip
    if peer == "llama":  # the same weights converted by llama.cpp's own tools (the inference bench's GGUFs)
        from bench_inference import gguf_model

        job["gguf"] = str(gguf_model(recipe["type"], cached_directory(), python))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    try:
        done = subprocess.run([python, str(PROBE), handle.name], capture_output=True, text=True, timeout=3600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})  # fmt: skip
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size = result["bytes"] / result["fp32_bytes"]
    return {"row": name, "peer": peer, "params_after": None, "params_before": None, "bytes_vs_fp32": size, "bytes_vs_fp16": 2 * size,
            "bits_per_weight": 32 * size, "metric_before": baseline["metric_before"], "metric_after": result["perplexity"]["main"],
            "held_out_before": baseline.get("held_out_before"), "held_out_after": result["perplexity"]["held_out"], "speedup": None,
            "secondary": None, "compression_s": result["seconds"], "wall_s": None, "target": None}  # fmt: skip


def print_table(model: str, rows: list[dict[str, Any]]) -> None:
    info = MODELS[model]
    base = rows[0]["metric_before"]
    held_out = info.get("held_out")
    print(f"\n{model}: {info['metric']} (fp32 {base:.4g}"
          + (f"; on {held_out} {rows[0]['held_out_before']:.4g}" if held_out else "") + f"){'; ' + info['note'] if info['note'] else ''}")
    secondary = info.get("secondary")
    print(f"{'row':<38} {'params':>12} {'bytes/fp32':>10} {'bits/w':>6} {info['metric']:>12} {'change':>8}"
          + (f" {held_out:>8} {'change':>8}" if held_out else "") + f" {'speedup':>8} {'compress s':>10}"
          + (f" {secondary:>22}" if secondary else ""))  # fmt: skip
    for row in rows:
        change = (row["metric_after"] - row["metric_before"]) / row["metric_before"] * 100
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        other = ""
        if held_out:
            moved = (row["held_out_after"] - rows[0]["held_out_before"]) / rows[0]["held_out_before"] * 100
            other = f" {row['held_out_after']:>8.4g} {moved:>+7.1f}%"
        print(f"{row['row']:<38} {fmt(row['params_after'], ',d'):>12} {fmt(row['bytes_vs_fp32'], '.3f'):>10} "
              f"{fmt(row.get('bits_per_weight'), '.2f'):>6} {row['metric_after']:>12.4g} {change:>+7.1f}%{other} {fmt(row['speedup'], '.2f'):>7}x "
              f"{row['compression_s']:>10.1f}" + (f" {fmt(row['secondary'], '.4f'):>22}" if secondary else ""))  # fmt: skip


OFF_SCALE = 2.5  # perplexity panels show up to this multiple of fp32's


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Quality against weight bytes, one panel per model: every krunch row a point, fp32 a star."""
    from matplotlib.figure import Figure

    columns = min(2, len(results))
    rows_of_panels = math.ceil(len(results) / columns)
    figure = Figure(figsize=(7 * columns, 5 * rows_of_panels))
    panels = figure.subplots(rows_of_panels, columns, squeeze=False).flatten()
    for axes in panels[len(results) :]:
        axes.set_visible(False)
    for axes, (model, rows) in zip(panels, results.items(), strict=False):
        info = MODELS[model]
        torch_row = rows[0]
        sized = [row for row in rows[1:] if row["bytes_vs_fp32"] is not None and not row.get("peer")]
        peers = [row for row in rows[1:] if row.get("peer")]
        # lower-is-better metrics (perplexity): rows past OFF_SCALE x fp32 sit on the top edge, their value in the label
        ceiling = None if info["higher_better"] else OFF_SCALE * rows[0]["metric_before"]

        def shown(value: float) -> float:
            return value if ceiling is None else min(value, ceiling)

        axes.scatter([1.0], [rows[0]["metric_before"]], marker="*", s=180, color="#4c72b0", label="fp32", zorder=3)
        axes.scatter([r["bytes_vs_fp32"] for r in sized], [shown(r["metric_after"]) for r in sized], color="#c44e52", label="krunch", zorder=3)
        if peers:
            axes.scatter([r["bytes_vs_fp32"] for r in peers], [shown(r["metric_after"]) for r in peers], marker="s", color="#55a868",
                         label="peer quantizers (same windows)", zorder=3)  # fmt: skip
        for row in sized + peers:
            off = ceiling is not None and row["metric_after"] > ceiling
            label = f"{row['row']} ({row['metric_after']:,.0f}, off scale)" if off else row["row"]
            axes.annotate(label, (row["bytes_vs_fp32"], shown(row["metric_after"])), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if ceiling is None or torch_row["metric_after"] <= ceiling:
            axes.axhline(torch_row["metric_after"], color="#8c8c8c", linestyle="--", linewidth=0.8)
        if torch_row["bytes_vs_fp32"] is not None:  # tables measured before its size was
            axes.scatter([torch_row["bytes_vs_fp32"]], [shown(torch_row["metric_after"])], marker="X", s=90, color="#8c8c8c",
                         label="torch quantize_dynamic int8", zorder=3)
            if ceiling is not None and torch_row["metric_after"] > ceiling:
                axes.annotate(f"{torch_row['metric_after']:,.1f}, off scale", (torch_row["bytes_vs_fp32"], ceiling), fontsize=7,
                              xytext=(6, -10), textcoords="offset points")  # fmt: skip
        axes.set_xlabel("weight bytes / fp32 (whole model)")
        axes.set_ylabel(info["metric"])
        if ceiling is not None:
            axes.set_ylim(0.95 * rows[0]["metric_before"], 1.05 * ceiling)
        axes.set_title(f"{model}: {info['metric']} vs size")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def merged_rows(earlier: dict[str, Any] | None, fresh: dict[str, Any]) -> dict[str, Any]:
    """A --rows run's table: the file's rows with the fresh ones replacing rows of the same name (new ones added at
    the end). Each row keeps the machine it ran on."""
    if earlier is None:
        return fresh
    rows = {row["row"]: {"machine": earlier["machine"], **row} for row in earlier["rows"]}
    rows |= {row["row"]: {**row, "machine": fresh["machine"]} for row in fresh["rows"]}
    return {"machine": fresh["machine"], "rows": list(rows.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--full", action="store_true", help="every row: TT and more ratios")
    parser.add_argument("--json", type=Path, help="also write the tables as JSON here (merged into the file's other models' tables)")
    parser.add_argument("--plot", type=Path, help="also draw quality against size (PNG) here")
    parser.add_argument("--rows", help="only rows whose names contain one of these comma-separated parts (fp32 and torch's "
                                       "int8 always run); --json then replaces just those rows in the file's tables")  # fmt: skip
    parser.add_argument("--no-peers", action="store_true", help="skip the peer quantizers' rows (HQQ, NNCF, torchao, llama.cpp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        for model in args.models.split(","):
            rows = [torch_dynamic_row(model)]
            generic = rows_for(MODELS[model]["match"], args.full) if MODELS[model]["match"] else {}
            extra = EXTRA_ROWS.get(model, {}) | (FULL_EXTRA_ROWS.get(model, {}) if args.full else {})
            for name, recipe in (generic | extra).items():
                if args.rows and not any(part in name for part in args.rows.split(",")):
                    continue
                print(f"  {model}: {name} ...", flush=True)
                rows.append(krunch_row(model, name, recipe, Path(scratch)))
            for name, (peer, recipe) in ({} if args.no_peers else PEERS.get(model, {})).items():
                if args.rows and not any(part in name for part in args.rows.split(",")):
                    continue
                print(f"  {model}: {name} ...", flush=True)
                if (row := peer_row(model, name, peer, recipe, rows[0])) is not None:
                    rows.append(row)
            results[model] = rows
            print_table(model, rows)
    machine = f"{torch.get_num_threads()} torch threads, CPU"
    tables = {model: {"machine": machine, "rows": rows} for model, rows in results.items()}
    if args.json and args.json.exists():  # tables of models not run this time stay (each says its machine)
        earlier = json.loads(args.json.read_text()).get("tables", {})
        if args.rows:
            tables = {model: merged_rows(earlier.get(model), table) for model, table in tables.items()}
        tables = earlier | tables
    if args.json:
        write_json(args.json, {"tables": tables})
    if args.plot:
        plot({model: table["rows"] for model, table in tables.items() if model in MODELS}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
