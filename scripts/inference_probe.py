#!/usr/bin/env python
"""One row of scripts/bench_inference.py, measured in a process of its own (so resident memory is this
model's alone), in whichever virtual environment the row's runtime lives: krunch's, torchao's or llama.cpp's.

    python scripts/inference_probe.py ROW.json   # prints one JSON line

ROW.json: {"runtime": "hf" | "krunch" | "torchao" | "llama", "path": ..., "dtype": "fp32" | "bf16",
"config": "int8" | "int4-g32" | ..., "threads": [1, 2], "prompt": [64 ids], "prefill": [512 ids], "new_tokens": 128}.
Imports only the standard library before the runtime's own; nothing here knows krunch.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TorchModel:
    """transformers' generate with a KV cache, greedy (or krunch's compiled greedy loop for `compile` rows);
    prefill is one forward that keeps the last logits."""

    def __init__(self, row: dict) -> None:
        import torch

        self.torch = torch
        torch.set_num_threads(max(row["threads"]))
        runtime = row["runtime"]
        if runtime == "krunch":
            import krunch

            self.model = krunch.load(row["path"])
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(row["path"], dtype=torch.float32)
            if row.get("dtype") == "bf16":
                self.model = self.model.to(torch.bfloat16)
            if runtime == "torchao":
                self.model = torchao_quantized(self.model, row["config"])
        self.model.eval()
        self.compiled = row.get("compile")  # decode steps on one compiled graph over a static cache (krunch's runtime)
        if self.compiled and self.compiled["loop"] == "generate":
            from krunch.runtime import compile_decode

            compile_decode(self.model, max_cache_len=self.compiled["max_cache_len"])

    def threads(self, count: int) -> None:
        self.torch.set_num_threads(count)

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        torch = self.torch
        ids = torch.tensor([prompt])
        if self.compiled and self.compiled["loop"] == "greedy_decode":
            from krunch.runtime import greedy_decode

            out = greedy_decode(self.model, ids, new_tokens, max_cache_len=self.compiled["max_cache_len"])
            return out[0, len(prompt) :].tolist()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    def prefill(self, ids: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.model(torch.tensor([ids]), logits_to_keep=1)

    def perplexity(self, ids: list[int], window: int = 512) -> float:
        """exp(mean NLL) over non-overlapping windows: the quality check of the same weights and kernels."""
        torch = self.torch
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(ids) - window + 1, window):
                batch = torch.tensor([ids[start : start + window]])
                logits = self.model(batch).logits[:, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits[0], batch[0, 1:], reduction="sum"))
                count += window - 1
        return round(float(torch.exp(torch.tensor(nll / count))), 4)


def torchao_quantized(model, config: str):
    """torchao's weight-only configs for CPU on a bf16 model, as its documentation runs them (the int4 one
    is its CPU layout, PrototypeInt4WeightOnlyConfig); inductor settings left alone."""
    import torch
    from torchao.quantization import quantize_

    model = model.to(torch.bfloat16)
    if config == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
        return model
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=int(config.split("-g")[1]), set_inductor_config=False))
    return model


class LlamaModel:
    """llama.cpp through llama-cpp-python: the same token ids, greedy, its own KV cache."""

    def __init__(self, row: dict) -> None:
        from llama_cpp import Llama

        self.row = row
        self.llm = Llama(model_path=row["path"], n_ctx=1024, n_threads=max(row["threads"]), n_batch=512,
                         logits_all=False, verbose=False)  # fmt: skip

    def threads(self, count: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=self.row["path"], n_ctx=1024, n_threads=count, n_threads_batch=count,
                         n_batch=512, logits_all=False, verbose=False)  # fmt: skip

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == new_tokens:
                break
        return out

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)


def import_runtime(row: dict) -> None:
    """The runtime's own code, imported before the baseline: resident memory is then the model's. transformers
    imports a model's modelling and generation code on first use (about 130 MB here): that is code, not the model."""
    if row["runtime"] == "llama":
        import llama_cpp  # noqa: F401
        return
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin  # noqa: F401

    if row["runtime"] == "krunch" or row.get("compile"):
        import krunch.runtime  # noqa: F401
        import krunch.sources.hf  # noqa: F401
    if row["runtime"] == "torchao":
        import torchao.quantization  # noqa: F401


def measure(row: dict) -> dict:
    import_runtime(row)
    before_load = rss_bytes()
    model = LlamaModel(row) if row["runtime"] == "llama" else TorchModel(row)
    start = time.perf_counter()
    model.generate(row["prompt"], 8)  # warm-up: kernels packed, caches allocated, decode compiled
    warm_up_s = time.perf_counter() - start
    resident = rss_bytes() - before_load
    result: dict = {"resident_bytes": resident, "warm_up_s": round(warm_up_s, 2), "decode_tokens_per_s": {}, "cpu_s_per_token": {}}
    for threads in row["threads"]:
        model.threads(threads)
        model.generate(row["prompt"], 4)
        cpu, start = cpu_seconds(), time.perf_counter()
        tokens = model.generate(row["prompt"], row["new_tokens"])
        elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
        result["decode_tokens_per_s"][str(threads)] = round(len(tokens) / elapsed, 3)
        result["cpu_s_per_token"][str(threads)] = round(used / len(tokens), 5)
        result["tokens"] = tokens
    model.prefill(row["prefill"][:64])
    start = time.perf_counter()
    model.prefill(row["prefill"])
    result["prefill_tokens_per_s"] = round(len(row["prefill"]) / (time.perf_counter() - start), 2)
    result["threads"] = max(row["threads"])
    if row.get("eval_ids") and isinstance(model, TorchModel):
        result["perplexity"] = model.perplexity(row["eval_ids"])
        if row["runtime"] == "krunch":  # the same model on the fp32 dequantize-then-matmul reference
            from krunch.runtime import set_exact

            set_exact(model.model)
            result["perplexity_exact"] = model.perplexity(row["eval_ids"])
    return result


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(Path(sys.argv[1]).read_text()))))
