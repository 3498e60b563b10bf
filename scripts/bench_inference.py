#!/usr/bin/env python
"""Inference speed the way users feel it: SmolLM2 at batch 1, krunch's compressed models next to PyTorch
fp32/bf16 eager, torchao's weight-only int8/int4 and llama.cpp's Q8_0/Q4_0, all in one run on this machine.

    .venv/bin/python scripts/bench_inference.py [--rows NAME,...] [--no-peers] [--json docs/bench_inference.json]
                                                [--plot docs/inference.png] [--markdown docs/bench_inference.md]

Every row runs in a fresh process (scripts/inference_probe.py) in its runtime's own environment
(scripts/bench_peers.sh makes the peers'); ratios are to PyTorch fp32 eager measured in the same run.
Columns: weight bytes, decode tokens/s at 1 and 2 threads (greedy, KV cache, 128 new tokens after a
64-token prompt, the prompt's time included), prefill tokens/s (512 tokens), resident memory the model
adds to its process once its runtime's code (torch, transformers' Llama modelling and generation code,
krunch's or torchao's loader; or llama_cpp) is imported, CPU seconds
per generated token (user + system, 2 threads), perplexity on 2048 held-out tokens (krunch rows also on the
fp32 dequantize-then-matmul reference), the first words. `+ compile` rows decode through
krunch.runtime.greedy_decode (one compiled step per token), the `(generate)` row through transformers'
`generate` set up by krunch.runtime.compile_decode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "scripts" / "inference_probe.py"
NEW_TOKENS, PROMPT_TOKENS, PREFILL_TOKENS, EVAL_TOKENS, THREADS = 128, 64, 512, 2048, [1, 2]
ALL = {"match": "*", "method": "none"}  # every Linear, the embedding and so the tied LM head
MLP = {"match": "model.layers.*.mlp.*", "method": "svd", "activationAware": True}
CALIBRATION = {"data": "wikipedia", "tokens": 8192}


def int4(group: int) -> dict:
    """The decoder's linears in int4 (asymmetric groups), the embedding and its tied LM head in int8."""
    return {"rules": [{"match": "model.layers.*", "method": "none", "quantize": {"bits": 4, "groupSize": group, "symmetric": False}},
                      ALL], "quantize": {"bits": 8}}  # fmt: skip


# row name -> how it is made: ("hf", dtype) | ("krunch", recipe) | ("torchao", config) | ("llama", gguf type)
ROWS: dict[str, tuple[str, Any]] = {
    "PyTorch fp32 eager": ("hf", "fp32"),
    "PyTorch bf16 eager": ("hf", "bf16"),
    "krunch int8": ("krunch", {"rules": [ALL], "quantize": {"bits": 8}}),
    "krunch int4 g32 (embedding int8)": ("krunch", int4(32)),
    "krunch int4 g64 (embedding int8)": ("krunch", int4(64)),
    "krunch bytesRatio 0.2": ("krunch", {"rules": [{"match": "model.layers.*", "method": "svd"}, ALL],
                                         "target": {"bytesRatio": 0.2}, "quantize": {"bits": 8}}),
    "krunch low-rank MLP params 0.8": ("krunch", {"rules": [{**MLP, "form": "factors"}], "target": {"paramRatio": 0.8},
                                                   "calibration": CALIBRATION}),
    "krunch tensor-train MLP params 0.8": ("krunch", {"rules": [{**MLP, "method": "tt"}], "target": {"paramRatio": 0.8},
                                                       "calibration": CALIBRATION}),
    "torchao int8 weight-only": ("torchao", "int8"),
    "torchao int4 weight-only g32": ("torchao", "int4-g32"),
    "llama.cpp Q8_0": ("llama", "Q8_0"),
    "llama.cpp Q4_0": ("llama", "Q4_0"),
}  # fmt: skip
FP32 = "PyTorch fp32 eager"
# Rows of the same models whose decode steps run compiled: row -> (the eager row, the decode loop).
COMPILED = {"PyTorch fp32 + compile": (FP32, "greedy_decode"), "krunch int8 + compile": ("krunch int8", "greedy_decode"),
            "krunch int8 + compile (generate)": ("krunch int8", "generate"),
            "krunch int4 g32 + compile": ("krunch int4 g32 (embedding int8)", "greedy_decode"),
            "krunch bytesRatio 0.2 + compile": ("krunch bytesRatio 0.2", "greedy_decode")}  # fmt: skip
MAX_CACHE_LEN = 256  # the compiled rows' static cache: the 64-token prompt and 128 new tokens fit
COMPILE_NOTE = ("\n`+ compile` rows: `krunch.runtime.greedy_decode(model, ids, 128, max_cache_len=256)`, a greedy loop whose "
                "every token is one compiled step (forward and argmax) over a static cache; the `(generate)` row: "
                "`krunch.runtime.compile_decode(model, max_cache_len=256)`, so transformers' `generate` runs each decode "
                "step on one inductor graph over a static cache; the prompt's prefill and the prefill column stay eager. Their "
                "first `generate` compiles (`warm_up_s` in the JSON).\n")


def log(message: str) -> None:
    print(f"[bench_inference {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cache_dir(*parts: str) -> Path:
    from krunch.cache import cache_path

    path = cache_path("bench-inference", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def token_ids(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """A 64-token prompt and 512 prefill tokens from the evaluation half of the Wikipedia text, and the
    EVAL_TOKENS after them for perplexity."""
    from krunch.data.text import Split, token_slice

    ids = token_slice(tokenizer, "wikipedia", Split.EVALUATION, PROMPT_TOKENS + PREFILL_TOKENS + EVAL_TOKENS)
    return ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS : PROMPT_TOKENS + PREFILL_TOKENS], ids[PROMPT_TOKENS + PREFILL_TOKENS :]


def krunch_model(name: str, recipe: dict, source) -> Path:
    """The compressed model for a row, built once and kept in the cache (keyed by recipe and krunch)."""
    import krunch

    key = hashlib.sha256(json.dumps([recipe, krunch.__version__], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir("models") / f"{name.replace(' ', '_')}-{key}"
    if not (target / "manifest.json").is_file():
        log(f"{name}: compressing")
        result = krunch.compress(source, recipe, progress=False)
        krunch.save(result, target)
    return target


def gguf_model(kind: str, hf_dir: Path, llama_python: str) -> Path:
    """The fp32 checkpoint converted with llama.cpp's own convert_hf_to_gguf.py, then llama_model_quantize."""
    target = cache_dir("gguf") / f"smollm2-135m-{kind}.gguf"
    if target.is_file():
        return target
    script = ROOT / "scripts" / "gguf_convert.py"
    subprocess.run([llama_python, str(script), str(hf_dir), kind, str(target)], check=True, timeout=1800)
    return target


def peer_pythons() -> dict[str, str]:
    """Each peer's python from scripts/bench_peers.sh, if it has been set up (it builds nothing here)."""
    root = Path(os.environ.get("KRUNCH_BENCH_PEERS", Path.home() / ".cache" / "krunch" / "bench-peers"))
    found = {}
    for name in ("torchao", "llama"):
        python = root / name / "bin" / "python"
        if python.exists() and any((root / name).glob(".installed-*")):
            found[name] = str(python)
    return found


def probe(python: str, row: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(row, handle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    try:
        done = subprocess.run([python, str(PROBE), handle.name], capture_output=True, text=True, timeout=1800, env=env)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(kind: str, path: Path) -> int:
    if kind == "llama":
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prepared_rows(names: list[str], peers: bool) -> tuple[list[tuple[str, str, dict]], Any, Path]:
    """Every row's model built (compressed, converted) before any row is timed: (name, python, probe row)."""
    from krunch.zoo import load_zoo_model
    from krunch.zoo.smollm2 import cached_directory

    source = load_zoo_model("smollm2-135m")
    hf_dir = cached_directory()
    prompt, prefill, eval_ids = token_ids(source.tokenizer)
    pythons = peer_pythons() if peers else {}
    prepared = []
    for name in names:
        eager_row, loop = COMPILED.get(name, (name, None))
        runtime, how = ROWS[eager_row]
        if runtime in ("torchao", "llama") and runtime not in pythons:
            why = f"{runtime} not set up: scripts/bench_peers.sh {runtime}" if peers else "--no-peers"
            log(f"{name}: skipped ({why})")
            continue
        python = pythons.get(runtime, sys.executable)
        row = {"runtime": runtime, "threads": THREADS, "prompt": prompt, "prefill": prefill, "new_tokens": NEW_TOKENS,
               "eval_ids": eval_ids}  # fmt: skip
        if runtime == "hf":
            path, row["dtype"] = hf_dir, how
        elif runtime == "krunch":
            path = krunch_model(eager_row, how, source)
        elif runtime == "torchao":
            path, row["config"] = hf_dir, how
        else:
            path = gguf_model(how, hf_dir, python)
        row["path"] = str(path)
        if name in COMPILED:
            row["compile"] = {"max_cache_len": MAX_CACHE_LEN, "loop": loop}
        prepared.append((name, python, row))
    return prepared, source.tokenizer, hf_dir


def measure_rows(prepared: list[tuple[str, str, dict]], tokenizer: Any, hf_dir: Path) -> list[dict]:
    rows = []
    for name, python, row in prepared:
        log(f"{name}: measuring")
        try:
            result = probe(python, row)
        except RuntimeError as err:
            log(f"{name}: failed: {err}")
            rows.append({"name": name, "runtime": row["runtime"], "error": str(err)[-500:]})
            continue
        path = Path(row["path"])
        stored = weight_bytes(row["runtime"], path) if row["runtime"] in ("krunch", "llama") else None
        result |= {"name": name, "runtime": row["runtime"], "weight_bytes": stored,
                   "first_words": tokenizer.decode(result.pop("tokens")[:24]).replace("\n", " ").strip()}  # fmt: skip
        rows.append(result)
    return with_ratios(rows, hf_dir)


def with_ratios(rows: list[dict], hf_dir: Path) -> list[dict]:
    base = next((r for r in rows if r["name"] == FP32 and "error" not in r), None)
    fp32_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    for row in rows:
        if row["name"] == FP32 or row["name"] == "PyTorch bf16 eager":
            row["weight_bytes"] = fp32_bytes // (2 if "bf16" in row["name"] else 1)
        if base is None or "error" in row:
            continue
        row["ratios"] = {
            "decode_1": round(row["decode_tokens_per_s"]["1"] / base["decode_tokens_per_s"]["1"], 3),
            "decode_2": round(row["decode_tokens_per_s"]["2"] / base["decode_tokens_per_s"]["2"], 3),
            "prefill": round(row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 3),
            "resident": round(row["resident_bytes"] / base["resident_bytes"], 3),
            "cpu_per_token": round(row["cpu_s_per_token"]["2"] / base["cpu_s_per_token"]["2"], 3),
            "weight_bytes": round(row["weight_bytes"] / fp32_bytes, 3) if row.get("weight_bytes") else None,
        }
    return rows


def markdown(rows: list[dict], machine: str) -> str:
    head = ("| row | weight bytes (x fp32) | decode tok/s 1 thr (x) | decode tok/s 2 thr (x) | prefill tok/s (x) "
            "| resident MB (x) | CPU s/token (x) | perplexity (fp32 reference path) | first words |")  # fmt: skip
    lines = [f"SmolLM2-135M, batch 1, {machine}; (x) = ratio to PyTorch fp32 eager in the same run.", "", head,
             "|" + "---|" * 9]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} ||||||||")
            continue
        x = r.get("ratios", {})
        wb = f"{r['weight_bytes'] / 1e6:.0f} MB ({x.get('weight_bytes')})" if r.get("weight_bytes") else ""
        lines.append(
            f"| {r['name']} | {wb} | {r['decode_tokens_per_s']['1']:.1f} ({x.get('decode_1')}) "
            f"| {r['decode_tokens_per_s']['2']:.1f} ({x.get('decode_2')}) | {r['prefill_tokens_per_s']:.0f} ({x.get('prefill')}) "
            f"| {r['resident_bytes'] / 2**20:.0f} ({x.get('resident')}) | {r['cpu_s_per_token']['2']:.4f} ({x.get('cpu_per_token')}) "
            f"| {perplexity(r)} | {r['first_words'][:60]} |"
        )
    return "\n".join(lines) + "\n"


def perplexity(row: dict) -> str:
    if "perplexity" not in row:
        return "-"
    exact = f" ({row['perplexity_exact']:.2f})" if "perplexity_exact" in row else ""
    return f"{row['perplexity']:.2f}{exact}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r and r.get("weight_bytes")]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in good:
        colour = {"hf": "black", "krunch": "tab:blue", "torchao": "tab:orange", "llama": "tab:green"}[r["runtime"]]
        ax.scatter(r["weight_bytes"] / 1e6, r["decode_tokens_per_s"]["2"], color=colour)
        ax.annotate(r["name"], (r["weight_bytes"] / 1e6, r["decode_tokens_per_s"]["2"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("weight bytes (MB)")
    ax.set_ylabel("decode tokens/s, batch 1, 2 threads")
    ax.set_title("SmolLM2-135M on this CPU: speed against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


# The other model kinds, measured in this process: items per second at batch 1 and 32 (2 threads).
MINILM_TT = {"target": {"paramRatio": 0.6}, "rules": [{"match": "encoder.layer.*.intermediate.dense", "method": "tt"},
                                                      {"match": "encoder.layer.?.output.dense", "method": "tt"}]}  # fmt: skip
ENCODER_ROWS: dict[str, list[tuple[str, dict | None]]] = {
    "minilm-l6": [("fp32", None), ("krunch int8", {"rules": [{"match": "encoder.*", "method": "none"}], "quantize": {"bits": 8}}),
                  ("krunch tensor-train FFN params 0.6", MINILM_TT)],
    "mobilenet-v2": [("fp32", None), ("krunch int8", {"rules": [ALL], "quantize": {"bits": 8}})],
}  # fmt: skip


def items_per_s(run, batches: list, repeats: int = 3) -> float:  # noqa: ANN001
    import torch

    with torch.inference_mode():
        run(batches[0])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            best = min(best, time.perf_counter() - start)
    return round(sum(len(b) if isinstance(b, list) else b.shape[0] for b in batches) / best, 2)


def encoder_rows() -> list[dict]:
    """MiniLM (Lee sentences) and MobileNetV2 (photo crops) at batch 1 and 32, fp32 against krunch's rows."""
    import torch

    import krunch
    from krunch.data.images import photo_crops
    from krunch.data.similarity import lee_documents
    from krunch.zoo import load_zoo_model

    torch.set_num_threads(2)
    rows = []
    for zoo_name, variants in ENCODER_ROWS.items():
        source = load_zoo_model(zoo_name)
        if zoo_name == "minilm-l6":
            texts = [doc[:200] for doc in lee_documents()][:32]
            def run(batch, module=None):  # noqa: ANN001, ANN202
                return module(**source.tokenizer(batch, padding=True, return_tensors="pt"))
            inputs = {1: [[t] for t in texts[:16]], 32: [texts]}
        else:
            images = torch.stack([source.preprocess(crop) for crop in photo_crops(crops_per_photo=4)[:32]])
            def run(batch, module=None):  # noqa: ANN001, ANN202
                return module(batch)
            inputs = {1: [images[i : i + 1] for i in range(16)], 32: [images]}
        base = None
        for label, recipe in variants:
            log(f"{zoo_name} {label}: measuring")
            module = source.module if recipe is None else krunch.compress(source.module, recipe, progress=False).module
            speeds = {str(size): items_per_s(lambda b, m=module: run(b, m), batches) for size, batches in inputs.items()}
            base = base or speeds
            rows.append({"model": zoo_name, "name": label, "items_per_s": speeds,
                         "ratios": {size: round(speeds[size] / base[size], 3) for size in speeds}})  # fmt: skip
    return rows


def encoder_markdown(rows: list[dict]) -> str:
    lines = ["", "Other model kinds, items per second (2 threads; (x) = ratio to fp32 in the same run):", "",
             "| model | row | batch 1 (x) | batch 32 (x) |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        s, x = r["items_per_s"], r["ratios"]
        lines.append(f"| {r['model']} | {r['name']} | {s['1']:.1f} ({x['1']}) | {s['32']:.1f} ({x['32']}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="skip torchao and llama.cpp rows")
    parser.add_argument("--prepare", action="store_true", help="build every row's model, time nothing")
    parser.add_argument("--no-encoders", action="store_true", help="skip the MiniLM and MobileNet rows")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench_inference.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "bench_inference.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "inference.png")
    args = parser.parse_args()
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(ROWS) + list(COMPILED)
    unknown = [n for n in names if n not in ROWS and n not in COMPILED]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS) + list(COMPILED)}")
    if FP32 not in names:
        names.insert(0, FP32)  # every ratio needs the baseline of the same run
    import platform

    import torch

    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    prepared, tokenizer, hf_dir = prepared_rows(names, not args.no_peers)
    if args.prepare:
        return 0
    rows = measure_rows(prepared, tokenizer, hf_dir)
    write_results(args, machine, rows, [])  # the decoder table is kept even if an encoder row fails
    plot(rows, args.plot)
    if not args.no_encoders:
        print(write_results(args, machine, rows, encoder_rows()))
    return 0


def write_results(args: argparse.Namespace, machine: str, rows: list[dict], encoders: list[dict]) -> str:
    table = markdown(rows, machine) + (encoder_markdown(encoders) if encoders else "")
    document = {"machine": machine, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
                "prefill_tokens": PREFILL_TOKENS, "threads": THREADS, "rows": rows, "encoder_rows": encoders}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    args.markdown.write_text("# Inference benchmark\n\n" + table + COMPILE_NOTE, encoding="utf-8")
    return table


if __name__ == "__main__":
    sys.exit(main())
