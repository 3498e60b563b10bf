"""Factorised replacements for nn.Conv2d: Tucker-2 (1x1, kxk core, 1x1) and CP (1x1, two depthwise, 1x1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLayer, quantize_config_json
from .quant import QuantFormat

if TYPE_CHECKING:  # built at compression time; the runtime only reads their fields
    from krunch.decompose.conv import CPConv, Tucker2


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        raise ValueError("only ungrouped Conv2d with numeric zero padding can be factorised")
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride), "padding": list(conv.padding), "dilation": list(conv.dilation),
            "bias": conv.bias is not None}  # fmt: skip


class _FactorisedConv(CompressedLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], bias: bool, quantize_config: dict | None) -> None:  # fmt: skip
        super().__init__(quantize_config)
        self.geometry = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": list(kernel_size),
                         "stride": list(stride), "padding": list(padding), "dilation": list(dilation), "bias": bias}  # fmt: skip
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None


class TuckerConv2d(_FactorisedConv):
    method = "tucker"

    def __init__(self, ranks: list[int], quantize_config: dict | None = None, **geometry: Any) -> None:
        super().__init__(quantize_config=quantize_config, **geometry)
        self.ranks = tuple(ranks)
        r_out, r_in = self.ranks
        kh, kw = self.geometry["kernel_size"]
        self.add_factor("in_factor", (self.geometry["in_channels"], r_in))
        self.add_factor("core", (r_out, r_in, kh, kw))
        self.add_factor("out_factor", (self.geometry["out_channels"], r_out))

    @classmethod
    def from_factors(cls, source: nn.Conv2d, tucker: Tucker2, quantize: QuantFormat | None = None) -> TuckerConv2d:
        layer = cls(list(tucker.ranks), quantize_config_json(quantize), **_geometry(source))
        for name in ("in_factor", "core", "out_factor"):
            layer.set_factor(name, getattr(tucker, name))
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        x = F.conv2d(x, self.factor("in_factor", x.dtype).T[:, :, None, None])
        x = F.conv2d(x, self.factor("core", x.dtype), stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
        return F.conv2d(x, self.factor("out_factor", x.dtype)[:, :, None, None], self.bias)

    def config(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), **self.geometry, "quantize_config": quantize_config_json(self.quantize_config)}

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("abhw,oa,ib->oihw", self.factor("core"), self.factor("out_factor"), self.factor("in_factor"))


class CPConv2d(_FactorisedConv):
    method = "cp"

    def __init__(self, rank: int, quantize_config: dict | None = None, **geometry: Any) -> None:
        super().__init__(quantize_config=quantize_config, **geometry)
        self.rank = rank
        kh, kw = self.geometry["kernel_size"]
        self.add_factor("in_factor", (self.geometry["in_channels"], rank))
        self.add_factor("height_factor", (kh, rank))
        self.add_factor("width_factor", (kw, rank))
        self.add_factor("out_factor", (self.geometry["out_channels"], rank))

    @classmethod
    def from_factors(cls, source: nn.Conv2d, cp: CPConv, quantize: QuantFormat | None = None) -> CPConv2d:
        layer = cls(cp.rank, quantize_config_json(quantize), **_geometry(source))
        for name in ("in_factor", "height_factor", "width_factor", "out_factor"):
            layer.set_factor(name, getattr(cp, name))
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, r = self.geometry, self.rank
        (sh, sw), (ph, pw), (dh, dw) = g["stride"], g["padding"], g["dilation"]
        x = F.conv2d(x, self.factor("in_factor", x.dtype).T[:, :, None, None])
        x = F.conv2d(x, self.factor("height_factor", x.dtype).T[:, None, :, None], stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r)
        x = F.conv2d(x, self.factor("width_factor", x.dtype).T[:, None, None, :], stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r)
        return F.conv2d(x, self.factor("out_factor", x.dtype)[:, :, None, None], self.bias)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, **self.geometry, "quantize_config": quantize_config_json(self.quantize_config)}

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("or,ir,hr,wr->oihw", self.factor("out_factor"), self.factor("in_factor"),
                            self.factor("height_factor"), self.factor("width_factor"))  # fmt: skip
