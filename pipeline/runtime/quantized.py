"""Dense layers whose weight is stored quantized (method none + quantize).

Linear layers (and so a tied LM head) multiply on the quantized kernels of `runtime.kernels`; an
embedding dequantizes only the rows it looks up; convolutions dequantize (no quantized conv kernel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLayer, quantize_config_json
from .fusion import FusedGroup
from .quant import QuantFormat, QuantizedData, dequantize

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizedLinear(CompressedLayer):
    method = "none"
    fusion: FusedGroup | None = None  # set by fusion.fuse_siblings: one matmul with its siblings (q/k/v, gate/up)

    def __init__(self, in_features: int, out_features: int, bias: bool, quantize_config: dict) -> None:
        super().__init__(quantize_config)
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.add_factor("weight_q", (out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_dense(cls, source: nn.Linear, quantize: QuantFormat, codes: QuantizedData | None = None) -> QuantizedLinear:
        """Round to nearest, or store `codes` chosen elsewhere (gptq) in the same layout."""
        layer = cls(source.in_features, source.out_features, source.bias is not None, quantize_config_json(quantize))
        layer.set_factor("weight_q", source.weight if codes is None else codes)
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fusion.output(self, x) if self.fusion is not None else None
        if fused is None:
            return self.linear(x, "weight_q", self.bias)
        return fused + self.bias if self.bias is not None else fused

    def extra_repr(self) -> str:
        fused = f", fused with {len(self.fusion.members) - 1} siblings" if self.fusion is not None else ""
        return f"{super().extra_repr()}, kernel={self.weight_q.kernel()[0].value}{fused}"

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.has_bias,
                "quantize_config": quantize_config_json(self.quantize_config)}  # fmt: skip

    def to_dense(self) -> torch.Tensor:
        return self.factor("weight_q")


class QuantizedConv2d(CompressedLayer):
    method = "none"

    def __init__(self, weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 bias: bool, quantize_config: dict) -> None:  # fmt: skip
        super().__init__(quantize_config)
        self.geometry = {"weight_shape": list(weight_shape), "stride": list(stride), "padding": list(padding),
                         "dilation": list(dilation), "groups": groups, "bias": bias}  # fmt: skip
        self.add_factor("weight_q", tuple(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0]), requires_grad=False) if bias else None

    @classmethod
    def from_dense(cls, source: nn.Conv2d, quantize: QuantFormat) -> QuantizedConv2d:
        if not isinstance(source.padding, tuple) or source.padding_mode != "zeros":
            raise ValueError("only numeric zero padding is supported")
        layer = cls(list(source.weight.shape), list(source.stride), list(source.padding), list(source.dilation),
                    source.groups, source.bias is not None, quantize_config_json(quantize))  # fmt: skip
        layer.set_factor("weight_q", source.weight)
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return F.conv2d(x, self.factor("weight_q", x.dtype), self.bias, g["stride"], g["padding"], g["dilation"], g["groups"])

    def config(self) -> dict[str, Any]:
        return {**self.geometry, "quantize_config": quantize_config_json(self.quantize_config)}

    def to_dense(self) -> torch.Tensor:
        return self.factor("weight_q")


class QuantizedEmbedding(CompressedLayer):
    """Rows are dequantized only for the looked-up tokens, in the dtype of the model they feed (`dtype`)."""

    method = "none"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, quantize_config: dict,
                 dtype: str = "float32") -> None:  # fmt: skip
        super().__init__(quantize_config)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
        self.output_dtype = dtype
        self.add_factor("weight_q", (num_embeddings, embedding_dim))

    @classmethod
    def from_dense(cls, source: nn.Embedding, quantize: QuantFormat) -> QuantizedEmbedding:
        layer = cls(source.num_embeddings, source.embedding_dim, source.padding_idx, quantize_config_json(quantize))
        layer.set_factor("weight_q", source.weight)
        return layer.finish_from(source)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.weight_q
        flat = ids.reshape(-1)
        values = q.stored_values(flat)
        scale = q.scale[flat]
        zero = q.zero_point[flat] if q.zero_point.numel() else q.zero_point
        data = QuantizedData(values, scale, zero, (len(flat), self.embedding_dim), q.config.bits, q.group_size)
        rows = dequantize(data, q.config.symmetric, FLOAT_DTYPES[self.output_dtype])
        return rows.reshape(*ids.shape, self.embedding_dim)

    def store_floats_as(self, dtype: torch.dtype) -> QuantizedEmbedding:
        self.output_dtype = next(name for name, value in FLOAT_DTYPES.items() if value == dtype)
        return self

    def config(self) -> dict[str, Any]:
        dtype = {} if self.output_dtype == "float32" else {"dtype": self.output_dtype}  # manifests of fp32 models as before
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "quantize_config": quantize_config_json(self.quantize_config), **dtype}  # fmt: skip

    def to_dense(self) -> torch.Tensor:
        return self.factor("weight_q")
