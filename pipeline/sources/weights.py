"""Read weight files without ever unpickling arbitrary objects.

`.safetensors` is read with safetensors; `.pt`/`.pth`/`.bin` only with
`torch.load(weights_only=True)`, and the result must be a flat mapping of names
to tensors (optionally wrapped in a `state_dict`/`model` key). Anything else is
refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from krunch.errors import ModelSourceError, UnsafeCheckpointError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: Path) -> StateDict:
    """Load a weight file as a name -> tensor mapping, refusing anything unsafe."""
    if not path.exists():
        raise ModelSourceError(str(path), "file not found")
    if not path.is_file():
        raise ModelSourceError(str(path), "not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ModelSourceError(str(path), f"not a valid safetensors file ({err})") from None
    if suffix in PICKLE_SUFFIXES:
        return _read_torch_file(path)
    raise ModelSourceError(
        str(path),
        f"unsupported weight file type {suffix!r}; use .safetensors, .pt or .pth",
    )


def _read_torch_file(path: Path) -> StateDict:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        message = str(err)
        if "weights_only" in message or "Unsupported global" in message or "Unsupported operand" in message:
            raise UnsafeCheckpointError(
                str(path),
                f"refused: the file holds pickled Python objects, not only tensors ({_unpickler_reason(message)}); "
                "re-save it as a state_dict of tensors or as .safetensors",
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
        raise ModelSourceError(str(path), f"not a readable torch file ({first_line})") from None
    return _as_state_dict(loaded, path)


def _unpickler_reason(message: str) -> str:
    """The one informative line of torch's long weights_only message, e.g. the refused global."""
    lines = [line.strip() for line in message.splitlines()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip()
            detail = detail or next((rest for rest in lines[index + 1 :] if rest), "")
            return detail.split(". ")[0].rstrip(".") or "weights_only load failed"
    return "weights_only load failed"


def _as_state_dict(loaded: object, path: Path) -> StateDict:
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if key in loaded and isinstance(loaded[key], Mapping):
                return _as_state_dict(loaded[key], path)
        bad = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if not bad and loaded:
            return dict(loaded)
        if bad:
            example = bad[0]
            kind = type(loaded[example]).__name__
            raise UnsafeCheckpointError(
                str(path),
                f"expected a mapping of names to tensors, but entry {example!r} is a {kind}",
            )
    raise UnsafeCheckpointError(
        str(path), f"expected a state_dict (mapping of names to tensors), got {type(loaded).__name__}"
    )


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Drop a wrapper prefix such as DataParallel's `module.` from every key."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: StateDict, source: str) -> None:
    """Load weights and insist every key matched both ways, naming the ones that did not."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches are raised even when strict=False
        detail = " ".join(str(err).split())[:300]
        raise ModelSourceError(source, f"weights do not match the architecture: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise ModelSourceError(source, "weights do not match the architecture: " + "; ".join(problems))
