"""A compressed model on disk: `model.safetensors` plus `manifest.json`, reloaded with no pickle at all.

The manifest names the source model (for the architecture around the
compressed layers), the recipe, and for each replaced layer its registered
type and constructor config; loading rebuilds empty layers from that
allow-list and fills them from safetensors, strictly.
"""

from __future__ import annotations

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


def load_compressed(directory: Path, reference: str | None = None) -> LoadedModel:
    from krunch.io import load_model

    reference = reference or f"krunch:{directory}"
    manifest = read_manifest(directory, reference)
    source = manifest["source"]
    loaded = load_model(source["source"], source.get("factory"))
    try:
        replacements = {entry["name"]: build_layer(entry["type"], entry["config"]) for entry in manifest["layers"]}
    except (TypeError, ValueError) as err:
        raise ModelSourceError(reference, f"manifest layer entry is invalid ({err})") from None
    tied = {entry["name"]: entry["tied_to"] for entry in manifest["layers"] if entry.get("tied_to")}
    assemble(loaded.module, replacements, tied)
    try:
        safetensors.torch.load_model(loaded.module, str(directory / WEIGHTS), strict=True)
    except (RuntimeError, OSError, safetensors.SafetensorError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ModelSourceError(reference, f"{WEIGHTS} does not match the manifest: {detail}") from None
    loaded.module.eval()
    loaded.reference = reference
    loaded.metadata["compressed_from"] = source["source"]
    for key in ("pinned_reference", "registry_version"):  # those described the source, not this model
        loaded.metadata.pop(key, None)
    return loaded
