"""The one place that counts: parameters (a quantized value counts as one), the bytes of saved tensors and
quantized layouts, and what a model holds in memory."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from krunch.runtime.base import CompressedLayer, QuantizedTensor
from krunch.runtime.quant import QuantFormat, packed_shape


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


def weight_bytes(module: nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of the distinct tensors in the state dict: what model.safetensors holds, header aside.
    `float_bytes=2`: what it would hold with its floating-point tensors in 16 bits (the fp16 model people
    deploy, against which an fp32 source's ratios are also given)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        # a meta tensor (a streamed model's) has no storage: it is one tensor, shared only as the same object
        key = (id(tensor), -1) if tensor.is_meta else (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            size = float_bytes if float_bytes is not None and tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * size
    return total


def float_dtype(module: nn.Module) -> str:
    """The dtype most of a module's floating-point numbers are in ('float32', 'bfloat16', ...): its source dtype."""
    counts: dict[str, int] = {}
    for tensor in module.state_dict(keep_vars=True).values():
        if tensor.is_floating_point():
            name = str(tensor.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else "float32"


def layer_params(module: nn.Module) -> int:
    """A layer's own parameters (weight + bias), before compression."""
    return sum(p.numel() for p in module.parameters(recurse=False))


def quantized_bytes(shape: tuple[int, ...], config: QuantFormat | Any) -> int:
    """Bytes a QuantizedTensor of this shape stores: values (int8, or int4 packed), fp16 scales, uint8 zero points."""
    layout = packed_shape(shape, config)
    return math.prod(layout["values"]) + 2 * math.prod(layout["scale"]) + math.prod(layout["zero_point"])


def stored_params(dense_params: int, replacement: nn.Module) -> int:
    """Numbers the layer stores (weights + bias), counting a quantized value as one parameter."""
    if not isinstance(replacement, CompressedLayer):
        return dense_params
    bias = getattr(replacement, "bias", None)
    total = 0 if bias is None else bias.numel()
    for name in replacement.factor_names:
        factor = getattr(replacement, name)
        total += math.prod(factor.shape) if isinstance(factor, QuantizedTensor) else factor.numel()
    return total


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages the module's parameters, buffers and kernel packs hold in memory."""
    seen: set[int] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        packed = getattr(sub, "_packed", None)
        if packed is not None:
            tensors += [t for t in (packed.weight, packed.scale, packed.offset, packed.ones) if t is not None]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
