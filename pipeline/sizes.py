"""What a model stores: parameters (a quantized value counts as one) and bytes of its saved tensors."""

from __future__ import annotations

import math

from torch import nn

from krunch.runtime.base import QuantizedTensor


def count_params(module: nn.Module) -> int:
    """Distinct stored numbers: tied tensors once, each quantized value as one."""
    seen: set[int] = set()
    total = 0
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    for sub in module.modules():
        if isinstance(sub, QuantizedTensor) and id(sub) not in seen:
            seen.add(id(sub))
            total += math.prod(sub.shape)
    return total


def bytes_without_bias(layer: nn.Module) -> int:
    """A layer's stored weight bytes, factors and quantization scales included, its (fp32) bias not."""
    bias = getattr(layer, "bias", None)
    return weight_bytes(layer) - (bias.numel() * bias.element_size() if bias is not None else 0)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors in the state dict: what model.safetensors holds, header aside."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
