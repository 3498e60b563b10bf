"""A joint size budget (`target.bytesRatio`): per layer, keep dense, factorise at one of several ranks, and
store as the source does (fp32, bf16, fp16), int8 or int4 (and int3 / int2 where `target.bits` offers them), so that the layers fit the bytes and the summed normalised error is smallest.

Each layer gets a table of candidates (bytes exact, as the saved tensors will
be; error estimated): the truncation error is the tail of the spectrum the
method truncates (as for paramRatio), the quantization error is measured by
quantizing the layer's own weight to nearest, and the two add (quantization
noise is relative to what is kept; with gptq rounding the dense candidates'
real weight errors are larger and their output errors smaller than this
estimate). Only candidates smaller than the dense fp32 weight
are offered, and no factorisation below the rule's floor (dense int8/int4 keep
every parameter). The table goes through the same Lagrangian allocator as
paramRatio (`krunch.plan.budget.allocate`), with bytes as the cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from krunch.plan.budget import LayerProfile, RankOption, allocate
from krunch.plan import LayerPlan, factorised_params, largest_saving_rank
from krunch.plan.profile import profile
from krunch.runtime.base import FLOAT_NAMES
from krunch.runtime.quant import dequantize, quantize
from krunch.sizes import quantized_bytes
from krunch.methods import QUANTIZE_ONLY
from krunch.spec import QuantizeConfig

FP32 = 4
RANK_STEPS = 16  # ranks offered per factorised layer, spread up to the break-even rank
# Storage layouts on offer per width, coarse to fine: (bits, group size; None = one scale per output channel).
# Several group sizes make a fine ladder of sizes, so the budget is met closely rather than in jumps of a bit.
LAYOUTS = {8: ((8, None), (8, 64)), 4: ((4, None), (4, 128), (4, 64), (4, 32)), 3: ((3, 128), (3, 64), (3, 32)), 2: ((2, 64), (2, 32))}


@dataclass(frozen=True)
class Candidate:
    rank: int | None  # None: the dense weight
    quantize: QuantizeConfig | None  # None: floats as the source stores them
    bytes: int  # weight storage (biases stay as they are and are outside the budget)
    error: float  # estimated squared relative error of the layer's weight
    floats: str = "fp32"  # how the source stores floats: fp32, bf16 or fp16

    @property
    def storage(self) -> str:
        if self.quantize is None:
            return self.floats
        return f"int{self.quantize.bits}" + (f"/g{self.quantize.group_size}" if self.quantize.group_size else "")

    @property
    def kind(self) -> str:
        """e.g. 'dense int8', 'factorised fp32': how the layers chosen are counted."""
        return f"{'dense' if self.rank is None else 'factorised'} {self.storage.split('/')[0]}"

    @property
    def label(self) -> str:
        return f"{'dense' if self.rank is None else f'rank {self.rank}'} {self.storage}"


@dataclass(frozen=True)
class LayerTable:
    name: str
    dense_bytes: int
    candidates: list[Candidate]  # Pareto front: bytes increasing, error decreasing


def quantize_configs(recipe_quantize: QuantizeConfig | None, widths: list[int]) -> list[QuantizeConfig]:
    """The layouts on offer at these widths (`target.bits`); symmetric and rounded to nearest unless recipe.quantize says otherwise
    (gptq and a fitted grid reach the layers kept dense; factors are rounded to nearest)."""
    base = recipe_quantize or QuantizeConfig()
    return [base.model_copy(update={"bits": bits, "group_size": group}) for width in sorted(set(widths), reverse=True)
            for bits, group in LAYOUTS[width]]  # fmt: skip


def factor_shapes(plan: LayerPlan, rank: int) -> list[tuple[int, ...]] | None:
    """Shapes of the stored factors at `rank`, where the method can quantize them exactly; None otherwise."""
    return plan.implementation.factor_shapes(plan, rank)


def index_bytes(plan: LayerPlan) -> int:
    """Bytes a layer stores besides its factors (a pivoted low-rank layer: where its output rows go)."""
    return plan.implementation.index_bytes(plan)


def quantization_error(weight: torch.Tensor, config: QuantizeConfig) -> float:
    """Squared relative error of round-to-nearest quantization of this weight."""
    w = weight.detach().float()
    restored = dequantize(quantize(w, config), config.symmetric)
    return float((restored - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))


def rank_grid(plan: LayerPlan) -> list[int]:
    top = largest_saving_rank(plan)
    return sorted({max(1, round(top * step / RANK_STEPS)) for step in range(1, RANK_STEPS + 1)})


def layer_table(plan: LayerPlan, weight: torch.Tensor, spectra: list[torch.Tensor], configs: list[QuantizeConfig],
                floats: torch.dtype = torch.float32) -> LayerTable:  # fmt: skip
    """Every candidate for one layer, then only those on the bytes/error Pareto front below the dense weight as
    the source stores it (`floats`: fp32, or a bf16/fp16 source's 2 bytes a number, float factors too)."""
    numel = math.prod(plan.weight_shape)
    float_bytes, name = floats.itemsize, FLOAT_NAMES.get(floats, str(floats).removeprefix("torch."))
    dense_bytes = float_bytes * numel
    quant_error = {config: quantization_error(weight, config) for config in configs}
    candidates = [Candidate(None, None, dense_bytes, 0.0, name)]
    candidates += [Candidate(None, config, quantized_bytes(plan.weight_shape, config), quant_error[config]) for config in configs]
    options = {option.rank: option for option in profile(plan, spectra).options}  # ranks above the floor: params, error
    fp32 = dataclasses.replace(plan, quantize=None)  # the storage form can depend on the bits (int4: two factors)
    for rank in (rank for rank in rank_grid(plan) if rank in options):
        kept = options[rank].error
        candidates.append(Candidate(rank, None, float_bytes * factorised_params(fp32, rank) + index_bytes(fp32), kept, name))
        for config in configs:
            nearest = config.nearest()  # factors are always rounded to nearest
            stored_as = dataclasses.replace(plan, quantize=nearest)
            shapes = factor_shapes(stored_as, rank)
            if shapes is not None:
                stored = sum(quantized_bytes(shape, config) for shape in shapes) + index_bytes(stored_as)
                candidates.append(Candidate(rank, nearest, stored, kept + (1 - kept) * quant_error[config]))
    return LayerTable(plan.name, dense_bytes, pareto_front(candidates, dense_bytes))


def table_for(plan: LayerPlan, weight: torch.Tensor, configs: list[QuantizeConfig]) -> LayerTable:
    """One layer's whole table from its weight alone: the unit of work a Ray task runs."""
    floats, weight = weight.dtype, weight.float()  # a bf16/fp16 source's layer, computed on in float32
    return layer_table(plan, weight, plan.implementation.spectra(plan, weight, None), configs, floats)


def pareto_front(candidates: list[Candidate], dense_bytes: int) -> list[Candidate]:
    """Cheapest first, keeping a candidate only if it is more accurate than every cheaper one; the dense fp32
    weight stays (error 0) and nothing at or above its size is offered besides it."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.bytes, c.error)):
        if candidate.bytes >= dense_bytes and (candidate.rank, candidate.quantize) != (None, None):
            continue
        if not front or candidate.error < front[-1].error:
            front.append(candidate)
    return front


def choose(tables: list[LayerTable], budget_bytes: int) -> dict[str, Candidate]:
    """One candidate per layer, total bytes <= budget, summed error smallest. The allocator's options carry the
    candidate's index as their rank and its bytes as their params."""
    profiles = [LayerProfile(t.name, [RankOption(i, c.bytes, c.error) for i, c in enumerate(t.candidates)]) for t in tables]
    chosen = allocate(profiles, budget_bytes)
    by_name = {t.name: t for t in tables}
    return {name: by_name[name].candidates[option.rank] for name, option in chosen.items()}


def applied(plan: LayerPlan, candidate: Candidate) -> LayerPlan:
    """The layer's plan once its candidate is chosen: dense ones become method none (quantized or not)."""
    method = plan.method if candidate.rank is not None else QUANTIZE_ONLY
    return dataclasses.replace(plan, method=method, quantize=candidate.quantize,
                               activation_aware=plan.activation_aware and method != QUANTIZE_ONLY)  # fmt: skip
