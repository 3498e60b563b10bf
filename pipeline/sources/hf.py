"""Load a local Hugging Face model directory (config.json + safetensors), offline and without remote code."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from krunch.errors import ModelSourceError
from krunch.model import LoadedModel, ModelKind

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Set while a compressed model is loaded: its architecture is all that is needed of the source, so parameters
# stay on the meta device (buffers, such as rotary frequencies, are built) and the compressed weights are assigned.
# "files": the same, for a streamed source (krunch.streaming): its weights stay in its files, which are recorded.
_ARCHITECTURE_ONLY = contextvars.ContextVar("krunch_architecture_only", default="")


@contextlib.contextmanager
def architecture_only(keep_files: bool = False) -> Iterator[None]:
    token = _ARCHITECTURE_ONLY.set("files" if keep_files else "architecture")
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


def empty_model(auto, config, dtype: torch.dtype | None = None):  # noqa: ANN001, ANN201 - transformers' Auto class and config
    """The architecture with parameters on the meta device (in `dtype`, default the config's): no memory for
    weights that will be replaced or read from their files when used."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = auto.from_config(config, trust_remote_code=False, **({"dtype": dtype} if dtype else {}))
    module.tie_weights()  # as from_pretrained does: a tied LM head is its embedding's parameter
    return module


def hf_model_kind(config: dict) -> ModelKind:
    """Causal LMs are evaluated by perplexity; any other encoder as a sentence embedder."""
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return ModelKind.CAUSAL_LM
    return ModelKind.SENTENCE_EMBEDDING


def read_hf_config(directory: Path, reference: str) -> dict:
    if not directory.exists():
        raise ModelSourceError(reference, "directory not found")
    if not directory.is_dir():
        raise ModelSourceError(reference, "not a directory (a Hugging Face model is a directory with config.json)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(reference, "no config.json: not a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelSourceError(reference, f"config.json is not valid JSON ({err})") from None


SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The float dtype most of the checkpoint's numbers are stored in, from the files' headers alone: a source
    keeps it (a bf16 checkpoint is not inflated to fp32), whatever config.json says."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                dtype = SAFETENSORS_FLOATS.get(piece.get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(piece.get_shape())
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def load_hf_directory(directory: Path, reference: str) -> LoadedModel:
    """Load with transformers' Auto classes; only safetensors weights, never pickles."""
    config = read_hf_config(directory, reference)
    if not any(directory.glob("*.safetensors")):
        found = [p.name for pattern in _WEIGHT_PATTERNS[1:] for p in directory.glob(pattern)]
        hint = f" (found {found[0]}: convert it to safetensors)" if found else ""
        raise ModelSourceError(reference, f"no .safetensors weights in the directory{hint}")

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a sub-second safetensors load needs no bar

    kind = hf_model_kind(config)
    auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
    files = tuple(sorted(directory.glob("*.safetensors")))
    mode = _ARCHITECTURE_ONLY.get()
    try:
        if mode:
            from transformers import AutoConfig

            config_object = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            module = empty_model(auto, config_object, stored_dtype(list(files)) if mode == "files" else None)
        else:
            module = auto.from_pretrained(
                directory, dtype=stored_dtype(list(files)), use_safetensors=True,
                trust_remote_code=False, local_files_only=True,
            )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(reference, f"transformers could not load it: {first_line}") from None
    return LoadedModel(
        reference=reference,
        module=module,
        kind=kind,
        tokenizer=tokenizer,
        metadata={"architecture": ",".join(config.get("architectures") or [type(module).__name__])},
        weight_files=() if mode == "architecture" else files,
    )


def hf_architecture(directory: Path, reference: str) -> LoadedModel:
    """A transformers model built from a saved config alone, its parameters on the meta device (the weights
    come from the compressed model's file): only classes transformers itself defines, never remote code."""
    config = read_hf_config(directory, reference)
    if config.get("auto_map"):
        raise ModelSourceError(reference, "config.json names remote code (auto_map); krunch never runs it")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kind = hf_model_kind(config)
    auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
    try:
        module = empty_model(auto, AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False))
    except (OSError, ValueError, KeyError) as err:
        raise ModelSourceError(reference, f"transformers could not build it: {str(err).strip()[:200]}") from None
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    return LoadedModel(reference, module, kind if tokenizer is not None else None, tokenizer)
