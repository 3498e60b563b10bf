"""Shared machinery: factors that are either float parameters or quantized buffers, and the type registry."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import PACK_BLOCK, Kernel, Packed, choose_kernel, codes_from_int4_pack, int4_pack_is_permutation, pack, quantized_linear
from .quant import QuantFormat, QuantizedData, dequantize, pack_codes, packed_shape, quantize

_LAYER_TYPES: dict[str, type[CompressedLayer]] = {}
FLOAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class QuantizedTensor(nn.Module):
    """A quantized tensor as buffers (values, scale, zero point); `dequantize()` gives float32 back.

    Matmuls go through `quantized_linear`, which packs the codes once per device for the best kernel
    (`packed`); the pack is a cache, never part of the state dict or of a pickle. The CPU int4 pack only
    rearranges the stored nibbles, so once it exists the stored codes are not kept beside it (half the codes'
    memory): the state dict, a pickle, `.to()` and dequantizing read them back from the pack.
    """

    def __init__(self, shape: tuple[int, ...], config: QuantFormat | Any) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.config = QuantFormat.of(config)
        layout = packed_shape(self.shape, self.config)
        self.group_size = layout["group_size"][0]
        dtype = torch.uint8 if self.config.bits < 8 else torch.int8
        self.register_buffer("values", torch.zeros(layout["values"], dtype=dtype))
        self.register_buffer("scale", torch.zeros(layout["scale"], dtype=torch.float16))
        self.register_buffer("zero_point", torch.zeros(layout["zero_point"], dtype=torch.uint8))
        self.exact = False  # True: dequantize and run in fp32 (the reference), whatever kernel exists
        self._packed: Packed | None = None
        self._codes_in_pack = False  # the values buffer is emptied: the int4 pack holds the codes

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, config: QuantFormat | Any) -> QuantizedTensor:
        return cls.from_data(quantize(tensor, config), config)

    @classmethod
    def from_data(cls, data: QuantizedData, config: QuantFormat | Any) -> QuantizedTensor:
        """Codes chosen elsewhere (gptq), stored as round-to-nearest's are."""
        module = cls(data.shape, config)
        module.values.copy_(data.values)
        module.scale.copy_(data.scale)
        module.zero_point.copy_(data.zero_point)
        return module

    def data(self) -> QuantizedData:
        return QuantizedData(self.stored_values(), self.scale, self.zero_point, self.shape, self.config.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._codes_in_pack:  # the nibbles straight from the pack, not packed again first
            data = QuantizedData(self.values, self.scale, self.zero_point, self.shape, self.config.bits, self.group_size)
            return dequantize(data, self.config.symmetric, dtype, codes=self._pack_codes())
        return dequantize(self.data(), self.config.symmetric, dtype)

    def stored_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The stored codes (of output channels `rows` only, if given), as saved: read back from the int4 pack
        when it holds them."""
        if not self._codes_in_pack:
            return self.values if rows is None else self.values[rows]
        return pack_codes(self._pack_codes(rows), self.config.bits)

    def _pack_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        assert self._packed is not None
        return codes_from_int4_pack(self._packed.weight, self.shape[0], self._packed.columns, rows)

    def _release_codes(self) -> None:
        """Empty the values buffer when the int4 pack holds the same nibbles (not while tracing a graph)."""
        packed = self._packed
        if (packed is not None and packed.kernel is Kernel.INT4_CPU and self.shape[0] % PACK_BLOCK == 0
                and not torch.compiler.is_compiling() and int4_pack_is_permutation()):  # fmt: skip
            self._buffers["values"] = torch.empty(0, dtype=self.values.dtype, device=self.values.device)
            self._codes_in_pack = True

    def _restore_codes(self) -> None:
        if self._codes_in_pack:
            self._buffers["values"] = self.stored_values()
            self._codes_in_pack = False

    def kernel(self, device: torch.device | str | None = None) -> tuple[Kernel, str]:
        """Which kernel a matmul with this weight runs on `device` (default: where the codes are), and why."""
        if self.exact:
            return Kernel.DEQUANTIZE, "exact: fp32 reference path chosen"
        return choose_kernel(self.shape, self.config, torch.device(device) if device else self.values.device)

    def packed(self, device: torch.device) -> Packed:
        if self._packed is None or self._packed.device != device:
            self._restore_codes()
            self._packed = pack(self.data(), self.config, device)
            self._release_codes()
        return self._packed

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedTensor:  # .to(), .cuda(), .half(): pack again
        self._restore_codes()
        self._packed = None
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._codes_in_pack:
            destination[prefix + "values"] = self.stored_values()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._restore_codes()
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if self._codes_in_pack:
            state["_buffers"] = {**state["_buffers"], "values": self.stored_values()}
        return {**state, "_packed": None, "_codes_in_pack": False}

    def extra_repr(self) -> str:
        group = f"group={self.config.group_size}" if self.config.group_size else "per-channel"
        kind = "sym" if self.config.symmetric else "asym"
        grid = ", fitted grid" if self.config.grid == "fitted" else ""
        return f"shape={self.shape}, int{self.config.bits}, {group}, {kind}, {self.config.rounding}{grid}, kernel={self.kernel()[0].value}"


def quantize_config_json(config: QuantFormat | Any | None) -> dict[str, Any] | None:
    """The manifest's form of a quantization layout (the spec's QuantizeConfig or a QuantFormat)."""
    return None if config is None else QuantFormat.of(config).to_json()


class CompressedLayer(nn.Module):
    """Base of every replacement layer: named factors, a JSON config to rebuild it, a dense view for checks."""

    method: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _LAYER_TYPES[cls.__name__] = cls

    def __init__(self, quantize_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.quantize_config = QuantFormat.from_json(quantize_config) if quantize_config else None
        self.factor_names: list[str] = []

    def add_factor(self, name: str, shape: tuple[int, ...]) -> None:
        """An empty factor of the right storage type; values arrive from `set_factor` or a state dict."""
        self.factor_names.append(name)
        if self.quantize_config is None:
            self.register_parameter(name, nn.Parameter(torch.zeros(shape), requires_grad=False))
        else:
            self.add_module(name, QuantizedTensor(shape, self.quantize_config))

    def set_factor(self, name: str, value: torch.Tensor | QuantizedData) -> None:
        target = getattr(self, name)
        if isinstance(value, QuantizedData):
            self.add_module(name, QuantizedTensor.from_data(value, target.config))
        elif isinstance(target, QuantizedTensor):
            self.add_module(name, QuantizedTensor.from_tensor(value, target.config))
        else:
            with torch.no_grad():
                target.copy_(value)

    def finish_from(self, source: nn.Module) -> CompressedLayer:
        """Copy the source's bias and move to its device: the last step of every `from_...` constructor."""
        if getattr(source, "bias", None) is not None:
            with torch.no_grad():
                self.bias.copy_(source.bias)
        return self.to(source.weight.device)

    def factor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A factor as a float tensor (in `dtype`, default as stored; quantized ones dequantize to float32 by
        default): for convolutions, tensor-train cores and checks."""
        value = getattr(self, name)
        if isinstance(value, QuantizedTensor):
            return value.dequantize(dtype or torch.float32)
        return value if dtype is None else value.to(dtype)

    def linear(self, x: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x times factor `name` transposed, on a quantized kernel when the factor is quantized."""
        value = getattr(self, name)
        if isinstance(value, QuantizedTensor):
            return quantized_linear(x, value, bias)
        return F.linear(x, value, bias)

    def store_floats_as(self, dtype: torch.dtype) -> CompressedLayer:
        """Float factors and bias in `dtype` (a bf16 or fp16 source's, computed on in float32); quantized codes,
        scales and zero points stay as they are. Returns the layer."""
        for parameter in self.parameters():
            parameter.data = parameter.data.to(dtype)
        return self

    def kernels(self) -> dict[str, str]:
        """Which kernel each quantized factor runs on (`fp32`, `bf16` or `fp16` for float factors)."""
        factors = {name: getattr(self, name) for name in self.factor_names}
        return {name: f.kernel()[0].value if isinstance(f, QuantizedTensor) else FLOAT_NAMES.get(f.dtype, str(f.dtype))
                for name, f in factors.items()}  # fmt: skip

    def config(self) -> dict[str, Any]:
        """Constructor arguments as JSON: enough to rebuild an empty layer before loading its tensors."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense weight these factors represent: for checks and error measurement, never in forward."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        quant = "" if self.quantize_config is None else f", int{self.quantize_config.bits}"
        details = ", ".join(f"{k}={v}" for k, v in self.config().items() if k not in ("quantize_config",))
        return f"method={self.method}, {details}{quant}"


def set_exact(module: nn.Module, exact: bool = True) -> int:
    """Run every quantized weight in `module` on the fp32 dequantize-then-matmul reference (or, with
    exact=False, on its packed kernel again); returns how many weights it switched."""
    weights = [m for m in module.modules() if isinstance(m, QuantizedTensor)]
    for weight in weights:
        weight.exact = exact
    return len(weights)


def layer_types() -> dict[str, type[CompressedLayer]]:
    return dict(_LAYER_TYPES)


def build_layer(type_name: str, config: dict[str, Any]) -> CompressedLayer:
    """Rebuild an empty layer from a manifest entry; only registered krunch layer types are allowed."""
    layer_type = _LAYER_TYPES.get(type_name)
    if layer_type is None:
        raise ValueError(f"unknown layer type {type_name!r} in manifest; known: {', '.join(sorted(_LAYER_TYPES))}")
    return layer_type(**config)
