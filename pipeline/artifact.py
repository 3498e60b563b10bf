"""A compressed model on disk: `model.safetensors` (or shards of at most 2 GB and their index, as
`save_pretrained` writes them) plus `manifest.json`, reloaded with no pickle at all.

The manifest names the source model (for the architecture around the
compressed layers), the recipe, and for each replaced layer its registered
type and constructor config; loading rebuilds empty layers from that
allow-list and fills them from safetensors, strictly.
"""

from __future__ import annotations

import contextvars
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
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3  # save_pretrained's default max_shard_size is 5 GB; 2 GB files suit object stores
ARCHITECTURE = "architecture"  # config.json (+ tokenizer) of a transformers model compressed in memory
MEMORY = "memory:"
MAX_NESTING = 4  # a compressed model whose source is a compressed model...: deeper is a loop
_nesting = contextvars.ContextVar("krunch_manifest_nesting", default=0)


def layer_entries(module: torch.nn.Module, tied: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": name, "type": type(layer).__name__, "config": layer.config(), "tied_to": tied.get(name)}
        for name, layer in module.named_modules()
        if isinstance(layer, CompressedLayer)
    ]


def save_compressed(directory: Path, model: LoadedModel, source: dict[str, Any], recipe: dict[str, Any],
                    tied: dict[str, str], max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model.module, directory, max_shard_bytes)
    write_manifest(directory, source, model.kind.value if model.kind else None, recipe, layer_entries(model.module, tied))
    return directory


def write_manifest(directory: Path, source: dict[str, Any], kind: str | None, recipe: dict[str, Any],
                   layers: list[dict[str, Any]]) -> None:  # fmt: skip
    manifest = {"format": FORMAT, "source": source, "kind": kind, "recipe": recipe, "layers": layers,
                "versions": {"krunch": __version__, "torch": torch.__version__}}  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def save_weights(module: torch.nn.Module, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """The module's tensors, each shared one (a tied embedding / LM head) under one name (`load_weights` gives it
    back to every name), in one `model.safetensors` or, past `max_shard_bytes`, in shards named and indexed as
    transformers' `save_pretrained` names them; each shard is written from the module's own tensors."""
    for stale in [*directory.glob("model*.safetensors"), directory / WEIGHTS_INDEX]:
        stale.unlink(missing_ok=True)
    state = distinct_tensors(module)
    shards = shard_names(state, max_shard_bytes)
    if len(shards) == 1:
        safetensors.torch.save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        return [directory / WEIGHTS]
    files, weight_map = [], {}
    for number, names in enumerate(shards, start=1):
        filename = shard_name(number, len(shards))
        safetensors.torch.save_file({name: state[name] for name in names}, str(directory / filename), metadata={"format": "pt"})
        files.append(directory / filename)
        weight_map |= dict.fromkeys(names, filename)
    write_index(directory, weight_map, sum(t.numel() * t.element_size() for t in state.values()))
    return files


def shard_name(number: int, count: int) -> str:
    """Shard `number` of `count`, named as transformers' `save_pretrained` names them."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def shard_names(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in state-dict order, cut into runs of at most `max_shard_bytes` (a bigger tensor alone)."""
    return runs_within([(name, t.numel() * t.element_size()) for name, t in state.items()], max_shard_bytes)


def runs_within(sized: list[tuple[Any, int]], limit: int) -> list[list[Any]]:
    """Items in their order, cut into runs whose sizes add up to at most `limit` (a bigger item alone)."""
    runs: list[list[Any]] = [[]]
    size = 0
    for item, nbytes in sized:
        if runs[-1] and size + nbytes > limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += nbytes
    return runs


def distinct_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (first name kept), every tensor contiguous and owning its bytes
    (safetensors refuses tensors that overlap)."""
    seen: dict[int, tuple[int, tuple[int, ...]]] = {}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        key, view = tensor.untyped_storage().data_ptr(), (tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() == 0:  # empty tensors (symmetric layouts' zero points) share no bytes, whatever their address
            state[name] = tensor.contiguous()
            continue
        if key in seen and seen[key] == view:
            continue  # the same tensor under another name
        state[name] = tensor.contiguous() if key not in seen else tensor.clone()
        seen.setdefault(key, view)
    return state


def weight_files(directory: Path, reference: str | None = None) -> list[Path]:
    """The safetensors files of a compressed model directory: the index's shards, or `model.safetensors`. Shard
    names come from the index and must be plain `.safetensors` names inside the directory."""
    index_path = directory / WEIGHTS_INDEX
    if not index_path.is_file():
        return [directory / WEIGHTS]
    where = reference or f"krunch:{directory}"
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelSourceError(where, f"{WEIGHTS_INDEX} is not a weight index ({type(err).__name__}: {str(err)[:200]})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ModelSourceError(where, f"{WEIGHTS_INDEX}: shard {name!r} is not a .safetensors file name in the directory")
    return [directory / name for name in names]


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


def _architecture(directory: Path, source: dict[str, Any], reference: str, skeleton: torch.nn.Module | None,
                  factory: str | None) -> LoadedModel:  # fmt: skip
    """The model the compressed layers go into. Nothing the manifest names is imported or called: a source built
    by a factory is rebuilt with the factory the user gives, which must be the one recorded."""
    from krunch.sources import load_model

    if skeleton is not None:
        return LoadedModel(reference, skeleton)
    if "source" in source:
        recorded = source.get("factory")
        if recorded and factory is None:
            raise ModelSourceError(reference, f"was compressed from {source['source']} built by {recorded}; loading never "
                                              "imports what a manifest names: pass the factory (--factory, or "
                                              "krunch.load(directory, factory=...)) or an instance (model=...)")  # fmt: skip
        if recorded and factory != recorded:
            raise ModelSourceError(reference, f"factory {factory} does not match the factory recorded in {MANIFEST} ({recorded})")
        from krunch.sources.hf import architecture_only

        with architecture_only():
            return load_model(source["source"], factory if recorded else None)
    if source.get("architecture") == "transformers":
        from krunch.sources.hf import hf_architecture

        return hf_architecture(directory / ARCHITECTURE, reference)
    raise ModelSourceError(reference, f"was compressed from a {source.get('class', 'module')} in memory: pass an instance "
                                      "of that architecture, krunch.load(directory, model=...)")  # fmt: skip


def load_weights(module: torch.nn.Module, paths: Path | list[Path], mapped: bool = False) -> None:
    """Fill the assembled model from the file (or shards, one at a time), strictly. An architecture built
    without weights (parameters on the meta device) is assigned the files' tensors (own copies, or with `mapped`
    the files' mapped pages, which the kernel may drop and read again); tied weights are stored once, so every
    name that shared a tensor before gets the one loaded under any of them."""
    expected = module.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in expected.values())
    copy = assign and not mapped
    shared: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        shared.setdefault(id(tensor), []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path in [paths] if isinstance(paths, Path) else paths:
        with safetensors.safe_open(str(path), "pt") as handle:  # copies are own, 64-byte aligned ones
            shard = {key: handle.get_tensor(key).clone() if copy else handle.get_tensor(key) for key in handle.keys()}
            unexpected = sorted(set(shard) - set(expected))
            if unexpected:
                raise RuntimeError(f"unexpected keys {unexpected[:5]}")
            module.load_state_dict(shard, strict=False, assign=assign)
            state.update(shard)
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ModelSourceError(reference, f"{MANIFEST} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelSourceError(reference, f"unsupported manifest format {found!r}; expected {FORMAT}")
    check_manifest(manifest, reference)
    return manifest


def check_manifest(manifest: dict[str, Any], reference: str) -> None:
    """The manifest's structure, field by field, before anything is built from it."""

    def refuse(field: str, reason: str) -> None:
        raise ModelSourceError(reference, f"{MANIFEST}: {field}: {reason}")

    def check(value: Any, field: str, kind: type | tuple[type, ...], what: str, required: bool = True) -> None:
        if value is None and not required:
            return
        if value is None:
            refuse(field, "missing")
        if not isinstance(value, kind) or isinstance(value, bool):
            refuse(field, f"expected {what}, got {type(value).__name__}")

    check(manifest.get("source"), "source", dict, "a mapping")
    for key in ("source", "factory", "architecture", "class"):
        check(manifest["source"].get(key), f"source.{key}", str, "a string", required=False)
    check(manifest.get("kind"), "kind", str, "a string", required=False)
    check(manifest.get("layers"), "layers", list, "a list")
    for index, entry in enumerate(manifest["layers"]):
        check(entry, f"layers[{index}]", dict, "a mapping")
        check(entry.get("name"), f"layers[{index}].name", str, "a string")
        check(entry.get("type"), f"layers[{index}].type", str, "a string")
        check(entry.get("config"), f"layers[{index}].config", dict, "a mapping")
        check(entry.get("tied_to"), f"layers[{index}].tied_to", str, "a string", required=False)


def _check_names(module: torch.nn.Module, layers: list[dict[str, Any]], reference: str) -> None:
    """Every layer the manifest replaces (or ties to) is a module of the architecture, never the model itself."""
    for index, entry in enumerate(layers):
        for field in ("name", "tied_to"):
            name = entry.get(field)
            if field == "tied_to" and name is None:
                continue
            try:
                found = bool(name) and module.get_submodule(name) is not None
            except AttributeError:
                found = False
            if not found:
                raise ModelSourceError(reference, f"{MANIFEST}: layers[{index}].{field}: no module {name!r} in the architecture")


def load_compressed(directory: Path, reference: str | None = None, skeleton: torch.nn.Module | None = None,
                    factory: str | None = None, streamed: bool = False, mapped: bool = False) -> LoadedModel:  # fmt: skip
    """`streamed`: the weights stay in the files and are read unit by unit as the model runs (krunch.streaming).
    `mapped`: the weights are the files' mapped pages, not copies (what a streamed driver hands to MLflow's pickle:
    page cache the kernel can drop under a memory cap, where copies would be the model's size of the driver's own)."""
    reference = reference or f"krunch:{directory}"
    manifest = read_manifest(directory, reference)
    source = manifest["source"]
    depth = _nesting.get()
    if depth >= MAX_NESTING:
        raise ModelSourceError(reference, f"compressed models nested more than {MAX_NESTING} deep ({MANIFEST} source chain)")
    token = _nesting.set(depth + 1)
    try:
        loaded = _architecture(directory, source, reference, skeleton, factory)
    finally:
        _nesting.reset(token)
    _check_names(loaded.module, manifest["layers"], reference)
    try:  # empty layers on the meta device: sizes come from the manifest, memory only from the weights file
        with torch.device("meta"):
            replacements = {entry["name"]: build_layer(entry["type"], entry["config"]) for entry in manifest["layers"]}
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelSourceError(reference, f"manifest layer entry is invalid ({' '.join(str(err).split())[:200]})") from None
    tied = {entry["name"]: entry["tied_to"] for entry in manifest["layers"] if entry.get("tied_to")}
    try:
        assemble(loaded.module, replacements, tied)
    except (AttributeError, KeyError, TypeError) as err:
        raise ModelSourceError(reference, f"{MANIFEST}: layers: cannot be installed ({err})") from None
    try:
        files = weight_files(directory, reference)
        if streamed:
            from krunch.streaming.store import TensorStore
            from krunch.streaming.units import stream

            stream(loaded.module, TensorStore(files))
        else:
            load_weights(loaded.module, files, mapped=mapped)
    except (RuntimeError, KeyError, OSError, safetensors.SafetensorError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ModelSourceError(reference, f"{' + '.join(f.name for f in files)} does not match the manifest: {detail}") from None
    loaded.module.eval()
    loaded.reference = reference
    loaded.metadata["compressed_from"] = source.get("source") or f"{MEMORY}{source.get('class')}"
    for key in ("pinned_reference", "registry_version"):  # those described the source, not this model
        loaded.metadata.pop(key, None)
    return loaded
