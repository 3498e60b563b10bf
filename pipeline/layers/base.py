"""Shared machinery: factors that are either float parameters or quantized buffers, and the type registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.quantize import QuantizedData, dequantize, packed_shape, quantize
from pipeline.spec import QuantizeConfig

_LAYER_TYPES: dict[str, type[CompressedLayer]] = {}


class QuantizedTensor(nn.Module):
    """A quantized tensor as buffers (values, scale, zero point); `dequantize()` gives float32 back."""

    def __init__(self, shape: tuple[int, ...], config: QuantizeConfig) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.config = config
        layout = packed_shape(self.shape, config)
        self.group_size = layout["group_size"][0]
        dtype = torch.uint8 if config.bits == 4 else torch.int8
        self.register_buffer("values", torch.zeros(layout["values"], dtype=dtype))
        self.register_buffer("scale", torch.zeros(layout["scale"], dtype=torch.float16))
        self.register_buffer("zero_point", torch.zeros(layout["zero_point"], dtype=torch.uint8))

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, config: QuantizeConfig) -> QuantizedTensor:
        return cls.from_data(quantize(tensor, config), config)

    @classmethod
    def from_data(cls, data: QuantizedData, config: QuantizeConfig) -> QuantizedTensor:
        """Codes chosen elsewhere (gptq), stored as round-to-nearest's are."""
        module = cls(data.shape, config)
        module.values.copy_(data.values)
        module.scale.copy_(data.scale)
        module.zero_point.copy_(data.zero_point)
        return module

    def data(self) -> QuantizedData:
        return QuantizedData(self.values, self.scale, self.zero_point, self.shape, self.config.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data(), self.config.symmetric)

    def extra_repr(self) -> str:
        group = f"group={self.config.group_size}" if self.config.group_size else "per-channel"
        kind = "sym" if self.config.symmetric else "asym"
        return f"shape={self.shape}, int{self.config.bits}, {group}, {kind}, {self.config.rounding.value}"


def quantize_config_json(config: QuantizeConfig | None) -> dict[str, Any] | None:
    return None if config is None else config.model_dump(by_alias=True, mode="json")


class CompressedLayer(nn.Module):
    """Base of every replacement layer: named factors, a JSON config to rebuild it, a dense view for checks."""

    method: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _LAYER_TYPES[cls.__name__] = cls

    def __init__(self, quantize_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.quantize_config = QuantizeConfig.model_validate(quantize_config) if quantize_config else None
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

    def factor(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        return value.dequantize() if isinstance(value, QuantizedTensor) else value

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


def layer_types() -> dict[str, type[CompressedLayer]]:
    return dict(_LAYER_TYPES)


def build_layer(type_name: str, config: dict[str, Any]) -> CompressedLayer:
    """Rebuild an empty layer from a manifest entry; only registered krunch layer types are allowed."""
    layer_type = _LAYER_TYPES.get(type_name)
    if layer_type is None:
        raise ValueError(f"unknown layer type {type_name!r} in manifest; known: {', '.join(sorted(_LAYER_TYPES))}")
    return layer_type(**config)
