"""Matmuls that read quantized codes, not a float copy of the weight: the kernel is chosen per device and shape.

A decode step multiplies one token's activations by every weight once, so it is bound by the bytes it
reads: torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) read int8 or
packed int4 codes directly and take bf16 activations. Many rows at once (prefill) are bound by arithmetic
instead, where a transient bf16 weight and one bf16 GEMM win; `exact` layers keep the fp32 reference path.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .memory import note_transient
from .quant import QuantFormat, QuantizedData, packed_shape

# Rows up to which the packed weight-only kernels beat a bf16 GEMM on a transient weight (docs/kernels.md).
PACKED_MAX_ROWS = 16
INT4_GROUPS = (32, 64, 128, 256)


class Kernel(str, enum.Enum):
    INT8_CPU = "int8pack"  # aten._weight_int8pack_mm: int8 codes, bf16 activations, fp32 scales applied after
    INT4_CPU = "int4pack"  # aten._weight_int4pack_mm_for_cpu: codes packed at load, bf16 scale and zero per group
    DEQUANTIZE = "dequantize"  # no kernel for this layout or device: dequantize, then F.linear in fp32


@dataclass(frozen=True)
class Packed:
    """A weight's codes in the chosen kernel's layout, for one device; never saved (the stored codes are)."""

    kernel: Kernel
    device: torch.device
    weight: torch.Tensor | None = None  # int8 codes (N, K), or the int4 pack
    scale: torch.Tensor | None = None  # int8: fp32 (N,); int4: bf16 (K / group, N, 2) scale and zero
    offset: torch.Tensor | None = None  # asymmetric int8: fp32 (N,), times the sum of each row's inputs
    ones: torch.Tensor | None = None  # int8: bf16 (N,) unit scales (the fp32 scales are applied to the output)
    group_size: int = 0
    columns: int = 0  # inputs the kernel takes: the weight's, padded with zeros to what the kernel needs


def choose_kernel(shape: tuple[int, ...], fmt: QuantFormat, device: torch.device) -> tuple[Kernel, str]:
    """The kernel for a stored weight of `shape` in layout `fmt` on a device, and why (shown by extra_repr,
    the report and `--dry-run`): a pure function of the layout, so a plan can say it before any work."""
    if len(shape) != 2:
        return Kernel.DEQUANTIZE, "not a matrix"
    rows, columns = shape
    if device.type != "cpu":
        return Kernel.DEQUANTIZE, f"no packed kernel for {device.type} yet"
    group = packed_shape(tuple(shape), fmt)["group_size"][0]
    if fmt.bits < 4:
        return Kernel.DEQUANTIZE, f"int{fmt.bits} (no packed int{fmt.bits} kernel: dequantized each forward)"
    if fmt.bits == 8:
        if fmt.group_size is not None and group != columns:
            return Kernel.DEQUANTIZE, "int8 in groups (the int8 kernel takes one scale per output channel)"
        return Kernel.INT8_CPU, "int8 per channel" + (f", {columns} inputs padded to {padded_columns(columns)}" if columns % 16 else "")
    if group not in INT4_GROUPS:
        return Kernel.DEQUANTIZE, f"int4 group {group} (the int4 kernel takes {', '.join(map(str, INT4_GROUPS))})"
    if rows % 16:
        return Kernel.DEQUANTIZE, f"{rows} output channels (the int4 kernel takes multiples of 16)"
    return Kernel.INT4_CPU, f"int4 group {group}"


@functools.cache
def transient_dtype() -> torch.dtype:
    """The dtype of a transient weight for a GEMM of many rows: bf16 where oneDNN multiplies it natively (AVX-512
    or AMX), else fp32 (on an AVX2-only CPU a bf16 GEMM runs about 4.6x slower than fp32's)."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def padded_columns(columns: int) -> int:
    """torch 2.13's AVX-512 int8 kernel reads past rows of other lengths (a segfault for 2 or 4 input rows)."""
    return -(-columns // 16) * 16


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its memory starts on a 64-byte boundary, else a copy that does: the int8 kernel
    segfaults on codes at other offsets (tensors assigned straight from a safetensors file can be)."""
    return tensor if tensor.is_contiguous() and tensor.data_ptr() % 64 == 0 else tensor.contiguous().clone()


def pack(data: QuantizedData, fmt: QuantFormat, device: torch.device) -> Packed:
    """The codes in the layout of the best kernel for `device`; the stored tensors are left as they are."""
    kernel, _ = choose_kernel(data.shape, fmt, device)
    if kernel is Kernel.INT8_CPU:
        scale = data.scale.float().reshape(-1)
        rows, columns = data.shape
        ones = torch.ones(rows, dtype=torch.bfloat16, device=device)
        codes = F.pad(data.values, (0, padded_columns(columns) - columns)) if columns % 16 else aligned(data.values)
        # stored v = code - 128 when asymmetric: w = (code - z) s = v s + (128 - z) s
        offset = None if fmt.symmetric else (128 - data.zero_point.float().reshape(-1)) * scale
        return Packed(kernel, device, codes, scale, offset, ones, columns=codes.shape[1])
    if kernel is Kernel.INT4_CPU:
        nibbles = torch.stack([data.values & 0x0F, data.values >> 4], dim=-1).reshape(data.shape[0], -1)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), 1)
        scale = data.scale.float()
        # the kernel computes (n - 8) * scale + zero for a nibble n; symmetric nibbles are code + 8
        zero = torch.zeros_like(scale) if fmt.symmetric else (8 - data.zero_point.float()) * scale
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return Packed(kernel, device, weight, scale_zero, group_size=data.group_size, columns=nibbles.shape[1])
    return Packed(kernel, device)


PACK_BLOCK = 64  # output channels per block of the CPU int4 pack: a byte holds channel b*64+d (low) and b*64+32+d


@functools.cache
def int4_pack_is_permutation() -> bool:
    """Whether this torch's CPU int4 pack only rearranges the nibbles (blocks of PACK_BLOCK output channels, each
    byte two channels 32 apart at one input), checked once on a random weight: then the stored codes can be
    read back from the pack, and need not be kept beside it."""
    codes = torch.randint(0, 16, (2 * PACK_BLOCK, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return weight.shape == (2 * PACK_BLOCK, 32) and torch.equal(codes_from_int4_pack(weight, 2 * PACK_BLOCK, 64), codes.to(torch.uint8))


def codes_from_int4_pack(weight: torch.Tensor, rows: int, columns: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The unsigned nibbles (rows, columns) the CPU int4 pack holds, or only the output channels `index`."""
    blocks = weight.view(rows // PACK_BLOCK, columns, PACK_BLOCK // 2)
    if index is not None:
        half = PACK_BLOCK // 2
        picked = blocks[index // PACK_BLOCK, :, index % half]  # (len(index), columns)
        return torch.where((index % PACK_BLOCK < half)[:, None], picked & 0x0F, picked >> 4)
    low, high = (blocks & 0x0F).transpose(1, 2), (blocks >> 4).transpose(1, 2)
    return torch.cat([low, high], dim=1).reshape(rows, columns)


def packed_matmul(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """x (rows, K) as bf16 times the packed weight, returned as fp32 (rows, N)."""
    if packed.kernel is Kernel.INT8_CPU and x.shape[0] == 1 and torch.compiler.is_compiling():
        return int8_row_reduction(x, packed)
    xb = padded(x.to(torch.bfloat16), packed)
    if packed.kernel is Kernel.INT8_CPU:
        out = torch.ops.aten._weight_int8pack_mm(xb, packed.weight, packed.ones).float() * packed.scale
        if packed.offset is not None:
            out = out + xb.float().sum(-1, keepdim=True) * packed.offset
        return out
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed.weight, packed.group_size, packed.scale).float()


def padded(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """x with zero inputs for the pack's padding columns (whose codes stand for zero weights)."""
    return F.pad(x, (0, packed.columns - x.shape[-1])) if x.shape[-1] < packed.columns else x


def int8_row_reduction(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """One row of activations times int8 codes, written as a reduction for inductor to compile: in a compiled
    decode step it becomes one loop that converts each code as it reads it and accumulates in fp32, which
    streams the codes about 1.5x faster than `_weight_int8pack_mm` (docs/kernels.md); eager or at more rows
    the aten kernel is faster. The activations stay fp32 (rounding them to bf16 as the kernel does makes the
    loop 3-4x slower), so a compiled step is the fp32 reference's to fp32 rounding, not the eager kernel's."""
    xf = padded(x.float(), packed)
    out = (xf[:, None, :] * packed.weight.float()).sum(-1) * packed.scale
    if packed.offset is not None:
        out = out + xf.sum(-1, keepdim=True) * packed.offset
    return out


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) for a quantized weight, on the kernel its layout and the number of rows call for."""
    packed = weight.packed(x.device)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_features = weight.shape[0]
    if packed.kernel is Kernel.DEQUANTIZE or weight.exact:
        return F.linear(x, weight.dequantize().to(x.dtype), bias)
    if rows > PACKED_MAX_ROWS:
        dtype = transient_dtype()
        out = F.linear(x.to(dtype), weight.dequantize(dtype)).to(x.dtype)
        note_transient()
    else:
        out = packed_matmul(x.reshape(rows, x.shape[-1]), packed).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out_features)
    return out + bias if bias is not None else out


class QuantizedWeight(Protocol):
    """What `quantized_linear` needs of a weight (runtime.base's QuantizedTensor)."""

    shape: tuple[int, ...]
    exact: bool

    def packed(self, device: torch.device) -> Packed: ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

