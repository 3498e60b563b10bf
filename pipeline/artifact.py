"""A compressed model on disk: `model.safetensors` plus `manifest.json`, reloaded with no pickle at all.

The manifest names the source model (for the architecture around the
compressed layers), the recipe, and for each replaced layer its registered
type and constructor config; loading rebuilds empty layers from that
allow-list and fills them from safetensors, strictly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from krunch import __version__
from krunch.assemble import assemble
from krunch.errors import ModelSourceError
from krunch.runtime import build_layer
from krunch.runtime.base import CompressedLayer
from krunch.model import LoadedModel

FORMAT = "krunch-compressed/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ARCHITECTURE = "architecture"  # config.json (+ tokenizer) of a transformers model compressed in memory
MEMORY = "memory:"


def layer_entries(module: torch.nn.Module, tied: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": name, "type": type(layer).__name__, "config": layer.config(), "tied_to": tied.get(name)}
        for name, layer in module.named_modules()
        if isinstance(layer, CompressedLayer)
    ]


def save_compressed(directory: Path, model: LoadedModel, source: dict[str, Any], recipe: dict[str, Any],
                    tied: dict[str, str]) -> Path:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    # save_model drops the duplicate names of shared tensors (a tied embedding / LM head) and load_model restores them.
    safetensors.torch.save_model(model.module, str(directory / WEIGHTS))
    manifest = {
        "format": FORMAT,
        "source": source,
        "kind": model.kind.value if model.kind else None,
        "recipe": recipe,
        "layers": layer_entries(model.module, tied),
        "versions": {"krunch": __version__, "torch": torch.__version__},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


def architecture_source(model: LoadedModel, directory: Path) -> dict[str, Any]:
    """How `load_compressed` rebuilds the architecture around the compressed layers: the source reference it
    was loaded from; for a transformers model handed over in memory, its config (and tokenizer) saved beside
    the weights; for any other module in memory, an instance the caller passes to `krunch.load`."""
    if not model.reference.startswith(MEMORY):
        return {"source": model.reference, "factory": model.metadata.get("factory")}
    config = getattr(model.module, "config", None)
    if type(model.module).__module__.startswith("transformers.") and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory / ARCHITECTURE)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(directory / ARCHITECTURE)
        return {"architecture": "transformers", "class": type(model.module).__name__}
    return {"architecture": "module", "class": f"{type(model.module).__module__}.{type(model.module).__qualname__}"}


def _architecture(directory: Path, source: dict[str, Any], reference: str, skeleton: torch.nn.Module | None) -> LoadedModel:
    """The model the compressed layers go into; nothing named by the manifest is imported or called."""
    from krunch.io import load_model

    if skeleton is not None:
        return LoadedModel(reference, skeleton)
    if "source" in source:
        from krunch.hf import architecture_only

        with architecture_only():
            return load_model(source["source"], source.get("factory"))
    if source.get("architecture") == "transformers":
        from krunch.hf import hf_architecture

        return hf_architecture(directory / ARCHITECTURE, reference)
    raise ModelSourceError(reference, f"was compressed from a {source.get('class', 'module')} in memory: pass an instance "
                                      "of that architecture, krunch.load(directory, model=...)")  # fmt: skip


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Fill the assembled model from the file, strictly. An architecture built without weights (parameters on
    the meta device) is assigned the file's tensors; tied weights are stored once (save_model drops the
    duplicate names), so every name that shared a tensor before gets the one loaded under any of them."""
    expected = module.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in expected.values())
    shared: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        shared.setdefault(id(tensor), []).append(name)
    with safetensors.safe_open(str(path), "pt") as handle:  # assigned tensors are own, 64-byte aligned copies
        state = {key: handle.get_tensor(key).clone() if assign else handle.get_tensor(key) for key in handle.keys()}
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise RuntimeError(f"unexpected keys {unexpected[:5]}")
        module.load_state_dict(state, strict=False, assign=assign)
    loaded = module.state_dict(keep_vars=True)
    missing = []
    for names in shared.values():
        present = [name for name in names if name in state]
        if not present:
            missing += names
            continue
        for name in names:
            if loaded[name] is not loaded[present[0]]:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                table = owner._parameters if leaf in owner._parameters else owner._buffers
                table[leaf] = loaded[present[0]]
    if missing:
        raise RuntimeError(f"missing keys {sorted(missing)[:5]}")


def read_manifest(directory: Path, reference: str) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelSourceError(reference, f"no {MANIFEST}: not a krunch compressed model directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelSourceError(reference, f"{MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ModelSourceError(reference, f"unsupported manifest format {manifest.get('format')!r}; expected {FORMAT}")
    return manifest


def load_compressed(directory: Path, reference: str | None = None, skeleton: torch.nn.Module | None = None) -> LoadedModel:
    reference = reference or f"krunch:{directory}"
    manifest = read_manifest(directory, reference)
    source = manifest["source"]
    loaded = _architecture(directory, source, reference, skeleton)
    try:
        empty = any(p.is_meta for p in loaded.module.parameters())  # an architecture without weights: so are its layers
        with torch.device("meta") if empty else contextlib.nullcontext():
            replacements = {entry["name"]: build_layer(entry["type"], entry["config"]) for entry in manifest["layers"]}
    except (TypeError, ValueError) as err:
        raise ModelSourceError(reference, f"manifest layer entry is invalid ({err})") from None
    tied = {entry["name"]: entry["tied_to"] for entry in manifest["layers"] if entry.get("tied_to")}
    assemble(loaded.module, replacements, tied)
    try:
        load_weights(loaded.module, directory / WEIGHTS)
    except (RuntimeError, OSError, safetensors.SafetensorError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ModelSourceError(reference, f"{WEIGHTS} does not match the manifest: {detail}") from None
    loaded.module.eval()
    loaded.reference = reference
    loaded.metadata["compressed_from"] = source.get("source") or f"{MEMORY}{source.get('class')}"
    for key in ("pinned_reference", "registry_version"):  # those described the source, not this model
        loaded.metadata.pop(key, None)
    return loaded
