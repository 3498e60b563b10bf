"""Which layers a recipe touches and how: rules matched to modules, checked before any work starts.

First matching rule wins; modules no rule matches stay exactly as they are.
Everything that can be checked without decomposing (a rule that selects
nothing, a method that does not fit the module, a fixed rank that is too big
or saves nothing, tied weights given different treatment) fails here, naming
the spec field.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from dataclasses import dataclass

from torch import nn

from krunch.decompose.conv import cp_params, tucker2_params
from krunch.decompose.pivot import pivoted_break_even_rank, pivoted_params
from krunch.decompose.svd import break_even_rank, low_rank_params
from krunch.decompose.tt import DEFAULT_CORES, factorize, max_ranks, mpo_params
from krunch.spec import LowRankForm, Method, QuantizeConfig, RankRule, Recipe, Rounding, Rule, SpecError, Target


class LayerKind(enum.Enum):
    LINEAR = "Linear"
    CONV2D = "Conv2d"
    EMBEDDING = "Embedding"


_KINDS = {nn.Linear: LayerKind.LINEAR, nn.Conv2d: LayerKind.CONV2D, nn.Embedding: LayerKind.EMBEDDING}
_METHOD_KINDS = {
    Method.NONE: (LayerKind.LINEAR, LayerKind.CONV2D, LayerKind.EMBEDDING),
    Method.SVD: (LayerKind.LINEAR,),
    Method.TT: (LayerKind.LINEAR,),
    Method.TUCKER: (LayerKind.CONV2D,),
    Method.CP: (LayerKind.CONV2D,),
}


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: LayerKind
    method: Method
    rule_index: int
    rank: RankRule | None  # None: allocated from recipe.target
    activation_aware: bool
    quantize: QuantizeConfig | None
    weight_shape: tuple[int, ...]
    params: int  # weight + bias, before
    tied_to: str | None = None  # an earlier layer whose weight this one shares
    floor: float | None = None  # with a target: the least fraction of the weight's parameters to keep
    form: LowRankForm | None = None  # svd: pivoted (the default) or factors

    @property
    def field(self) -> str:
        return f"spec.recipe.rules[{self.rule_index}]"

    @property
    def bias_params(self) -> int:
        return self.params - math.prod(self.weight_shape)

    @property
    def weight_params(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def pivoted(self) -> bool:
        """svd stored as pivot rows + coefficients. Without a form, int4 factors keep two factors: 4-bit noise in
        the pivot rows would reach every other row through the coefficients (whitened error 0.26 vs 0.14 on SmolLM2)."""
        if self.method is not Method.SVD or self.form is not None:
            return self.form is LowRankForm.PIVOTED
        return self.quantize is None or self.quantize.bits > 4

    @property
    def gptq(self) -> bool:
        """Rounded by gptq: a dense Linear weight whose quantize config asks for it."""
        dense_linear = self.method is Method.NONE and self.kind is LayerKind.LINEAR
        return dense_linear and self.quantize is not None and self.quantize.rounding is Rounding.GPTQ

    @property
    def calibrated(self) -> bool:
        """Needs the Gram matrix of its calibration inputs: activation-aware factors, or gptq rounding."""
        return self.activation_aware or self.gptq

    @property
    def tt_factors(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = self.weight_shape
        return factorize(out_features, DEFAULT_CORES), factorize(in_features, DEFAULT_CORES)


@dataclass(frozen=True)
class Plan:
    layers: list[LayerPlan]

    @property
    def allocated(self) -> list[LayerPlan]:
        """Factorised layers whose rank comes from the global budget."""
        return [layer for layer in self.layers if layer.rank is None and layer.method is not Method.NONE]


def module_kind(module: nn.Module) -> LayerKind | None:
    return _KINDS.get(type(module))


def layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def make_plan(model: nn.Module, recipe: Recipe) -> Plan:
    candidates = [(name, module) for name, module in model.named_modules() if module_kind(module) is not None]
    layers: list[LayerPlan] = []
    claimed: set[str] = set()
    for index, rule in enumerate(recipe.rules):
        matched = [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, rule.match)]
        fresh = [(n, m) for n, m in matched if n not in claimed]
        if not fresh:
            raise SpecError(f"spec.recipe.rules[{index}].match", _nothing_selected(rule.match, matched, candidates))
        for name, module in fresh:
            claimed.add(name)
            layers.append(_layer_plan(name, module, index, rule, recipe.quantize, recipe.target))
    order = {name: index for index, (name, _) in enumerate(candidates)}
    layers.sort(key=lambda layer: order[layer.name])  # module order, whichever rule claimed them
    return Plan(_resolve_ties(model, layers))


def _nothing_selected(pattern: str, matched: list, candidates: list) -> str:
    if matched:
        return f"{pattern!r} only matches modules an earlier rule already took (first match wins), e.g. {matched[0][0]}"
    examples = ", ".join(n for n, _ in candidates[:3])
    return f"{pattern!r} selects no Linear, Conv2d or Embedding module (names look like: {examples})"


def _rounding_for(name: str, kind: LayerKind, index: int, rule: Rule, default: QuantizeConfig | None,
                  target: Target | None) -> QuantizeConfig | None:  # fmt: skip
    """The rule's quantize config, with gptq only where it applies: dense Linear weights, including those a bytesRatio
    budget may keep dense. recipe.quantize is a default over many rules, so elsewhere it falls back to nearest; a rule
    of its own asking for gptq where it cannot work is an error."""
    config = rule.quantize_config(default)
    budgeted = target is not None and target.bytes_ratio is not None and rule.rank is None
    if config is None or config.rounding is not Rounding.GPTQ or kind is LayerKind.LINEAR and (rule.method is Method.NONE or budgeted):
        return config
    if isinstance(rule.quantize, QuantizeConfig):
        what = f"a {kind.value}" if kind is not LayerKind.LINEAR else f"stored as {rule.method.value} factors"
        raise SpecError(f"spec.recipe.rules[{index}].quantize.rounding",
                        f"gptq rounds dense Linear weights (method none); {name} is {what}: use rounding nearest")  # fmt: skip
    return config.nearest()


def _layer_plan(name: str, module: nn.Module, index: int, rule: Rule, default_quantize: QuantizeConfig | None,
                target: Target | None = None) -> LayerPlan:  # fmt: skip
    kind = module_kind(module)
    assert kind is not None
    if kind not in _METHOD_KINDS[rule.method]:
        allowed = ", ".join(k.value for k in _METHOD_KINDS[rule.method])
        raise SpecError(f"spec.recipe.rules[{index}].method", f"{rule.method.value} applies to {allowed}, but {name} is a {kind.value}")
    if kind is LayerKind.CONV2D and rule.method is not Method.NONE and module.groups != 1:
        raise SpecError(f"spec.recipe.rules[{index}].method", f"{name} is a grouped/depthwise Conv2d; use method none (quantize only)")
    plan = LayerPlan(
        name=name,
        kind=kind,
        method=rule.method,
        rule_index=index,
        rank=rule.rank,
        activation_aware=rule.activation_aware,
        quantize=_rounding_for(name, kind, index, rule, default_quantize, target),
        weight_shape=tuple(module.weight.shape),
        params=layer_params(module),
        floor=rule.floor,
        form=rule.form,
    )
    if rule.rank is not None and rule.rank.fixed is not None:
        check_fixed_rank(plan, rule.rank.fixed)
    return plan


def factorised_params(plan: LayerPlan, rank: int) -> int:
    """Weight parameters after factorising at one rank (bond dimension for tt, both channel ranks for tucker)."""
    if plan.method is Method.SVD or plan.method is Method.CP:
        return params_for_ranks(plan, [rank])
    caps = plan_rank_caps(plan)
    return params_for_ranks(plan, [min(rank, cap) for cap in caps])


def plan_rank_caps(plan: LayerPlan) -> list[int]:
    if plan.method is Method.TT:
        return max_ranks(*plan.tt_factors)
    if plan.method is Method.TUCKER:
        return list(plan.weight_shape[:2])
    return [min(plan.weight_shape)]


def params_for_ranks(plan: LayerPlan, ranks: list[int]) -> int:
    """Weight parameters for concrete ranks: [r] (svd, cp), bond dimensions (tt), [r_out, r_in] (tucker)."""
    shape = plan.weight_shape
    if plan.method is Method.SVD:
        return (pivoted_params if plan.pivoted else low_rank_params)(shape[0], shape[1], ranks[0])
    if plan.method is Method.TT:
        return mpo_params(*plan.tt_factors, tuple(ranks))
    if plan.method is Method.TUCKER:
        return tucker2_params(shape, (ranks[0], ranks[1]))
    if plan.method is Method.CP:
        return cp_params(shape, ranks[0])
    raise AssertionError(plan.method)


def largest_saving_rank(plan: LayerPlan) -> int:
    """The break-even rank: the largest one that still stores fewer numbers than the dense weight."""
    dense = math.prod(plan.weight_shape)
    if plan.method is Method.SVD:
        return (pivoted_break_even_rank if plan.pivoted else break_even_rank)(*plan.weight_shape)
    rank = 0
    while factorised_params(plan, rank + 1) < dense and rank < max(plan.weight_shape):
        rank += 1
    return rank


def check_fixed_rank(plan: LayerPlan, rank: int) -> None:
    field = f"{plan.field}.rank.fixed"
    shape = "x".join(map(str, plan.weight_shape))
    if plan.method is Method.SVD and rank > min(plan.weight_shape):
        raise SpecError(field, f"rank {rank} exceeds the largest possible rank {min(plan.weight_shape)} of {plan.name} ({shape})")
    if rank > largest_saving_rank(plan):
        raise SpecError(field, f"rank {rank} {saving_problem(plan, factorised_params(plan, rank))}")


def saving_problem(plan: LayerPlan, params: int) -> str:
    """Why a factorisation is refused: it stores at least as many numbers as the dense weight."""
    shape = "x".join(map(str, plan.weight_shape))
    return (
        f"does not reduce {plan.name} ({shape}): {plan.method.value} would store {params:,} numbers vs "
        f"{plan.params - plan.bias_params:,} dense; the break-even rank is {largest_saving_rank(plan)}"
    )


def _resolve_ties(model: nn.Module, layers: list[LayerPlan]) -> list[LayerPlan]:
    """Layers sharing one weight (SmolLM2's embedding is its LM head) must be treated alike; stored once."""
    owner: dict[int, LayerPlan] = {}
    resolved = []
    for layer in layers:
        weight = model.get_submodule(layer.name).weight
        first = owner.get(id(weight))
        if first is None:
            owner[id(weight)] = layer
            resolved.append(layer)
            continue
        if layer.method is not Method.NONE or first.method is not Method.NONE or _layout(layer.quantize) != _layout(first.quantize):
            raise SpecError(
                f"{layer.field}.method",
                f"{layer.name} shares its weight with {first.name}; tied weights can only be quantized alike "
                f"(method none and the same quantize for both)",
            )
        # it stores nothing of its own: it reads the owner's weight, however that was rounded
        resolved.append(LayerPlan(**{**layer.__dict__, "tied_to": first.name, "quantize": first.quantize}))
    return resolved


def _layout(config: QuantizeConfig | None) -> QuantizeConfig | None:
    return None if config is None else config.nearest()
