"""Which layers a recipe touches and how: rules matched to modules, checked before any work starts.

First matching rule wins; modules no rule matches stay exactly as they are.
Everything that can be checked without decomposing (a rule that selects
nothing, a method that does not fit the module, a fixed rank that is too big
or saves nothing, tied weights given different treatment) fails here, naming
the spec field.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from krunch import methods
from krunch.methods import LayerKind
from krunch.sizes import layer_params
from krunch.spec import Grid, LowRankForm, QuantizeConfig, RankRule, Recipe, Rounding, Rule, SpecError, Target

_KINDS = {nn.Linear: LayerKind.LINEAR, nn.Conv2d: LayerKind.CONV2D, nn.Embedding: LayerKind.EMBEDDING}


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: LayerKind
    method: str  # a registered method's name (krunch.methods)
    rule_index: int
    rank: RankRule | None  # None: allocated from recipe.target
    activation_aware: bool
    quantize: QuantizeConfig | None
    weight_shape: tuple[int, ...]
    params: int  # weight + bias, before
    tied_to: str | None = None  # an earlier layer whose weight this one shares
    floor: float | None = None  # with a target: the least fraction of the weight's parameters to keep
    max_error: float | None = None  # with a target: the largest relative truncation error allowed (None: the default)
    form: LowRankForm | None = None  # svd: pivoted (the default) or factors
    options: Any = None  # the rule's method options, validated by the method's model
    calibration_set: bool = False  # the recipe has a calibration section (a fitted grid is then weighted by it)

    @property
    def implementation(self) -> methods.CompressionMethod:
        return methods.get(self.method)

    @property
    def factorized(self) -> bool:
        """Stored as factors with a rank (False: the dense weight, quantized or not)."""
        return self.implementation.factorizing

    @property
    def seed(self) -> int:
        """A seed from the layer's name: the same factors whatever order or worker runs it."""
        return zlib.crc32(self.name.encode())

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
    def gptq(self) -> bool:
        """Rounded by gptq: a dense Linear weight whose quantize config asks for it."""
        dense_linear = not self.factorized and self.kind is LayerKind.LINEAR
        return dense_linear and self.quantize is not None and self.quantize.rounding is Rounding.GPTQ

    @property
    def grid_fitted_to_inputs(self) -> bool:
        """A dense Linear weight rounded to nearest on a grid fitted for its calibration inputs (a tied one reads
        its owner's weight, however that was fitted)."""
        dense_linear = not self.factorized and self.kind is LayerKind.LINEAR and self.tied_to is None
        fitted = self.quantize is not None and self.quantize.grid is Grid.FITTED
        return dense_linear and fitted and self.calibration_set and not self.gptq

    @property
    def calibrated(self) -> bool:
        """Needs the Gram matrix of its calibration inputs: activation-aware factors, gptq rounding, or a grid
        fitted to the inputs."""
        return self.activation_aware or self.gptq or self.grid_fitted_to_inputs

@dataclass(frozen=True)
class Plan:
    layers: list[LayerPlan]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, why): subclasses krunch does not replace

    def skipped_reasons(self) -> dict[str, list[str]]:
        """Why modules were left as they are, with the modules each reason covers."""
        reasons: dict[str, list[str]] = {}
        for name, why in self.skipped:
            reasons.setdefault(why, []).append(name)
        return reasons

    @property
    def allocated(self) -> list[LayerPlan]:
        """Factorised layers whose rank comes from the global budget."""
        return [layer for layer in self.layers if layer.rank is None and layer.factorized]


def module_kind(module: nn.Module) -> LayerKind | None:
    """Linear, Conv2d or Embedding, including subclasses that compute what their base does (same forward):
    those are safe to replace. A subclass with a forward of its own is not (see `unsafe_subclass`)."""
    for base, kind in _KINDS.items():
        if isinstance(module, base) and unsafe_subclass(module, base) is None:
            return kind
    return None


def unsafe_subclass(module: nn.Module, base: type[nn.Module]) -> str | None:
    """Why a subclass of a layer krunch replaces cannot be replaced: it changes what its base computes."""
    for attribute in ("forward", "_conv_forward"):
        if hasattr(base, attribute) and getattr(type(module), attribute) is not getattr(base, attribute):
            return (f"{type(module).__name__} subclasses {base.__name__} with its own {attribute}: a replacement "
                    f"would compute {base.__name__}'s and drop what it adds")  # fmt: skip
    return None


def skipped_subclasses(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, reason) for name, module in model.named_modules() for base in _KINDS
            if isinstance(module, base) and (reason := unsafe_subclass(module, base)) is not None]  # fmt: skip


def make_plan(model: nn.Module, recipe: Recipe) -> Plan:
    candidates = [(name, module) for name, module in model.named_modules() if module_kind(module) is not None]
    skipped = skipped_subclasses(model)
    layers: list[LayerPlan] = []
    claimed: set[str] = set()
    for index, rule in enumerate(recipe.rules):
        matched = [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, rule.match)]
        fresh = [(n, m) for n, m in matched if n not in claimed]
        if not fresh:
            unsafe = [(n, why) for n, why in skipped if fnmatch.fnmatchcase(n, rule.match)]
            reason = (f"{rule.match!r} only matches modules krunch leaves as they are, e.g. {unsafe[0][0]}: {unsafe[0][1]}"
                      if unsafe and not matched else _nothing_selected(rule.match, matched, candidates))  # fmt: skip
            raise SpecError(f"spec.recipe.rules[{index}].match", reason)
        options = rule.method_options()  # once per rule, not per module
        for name, module in fresh:
            claimed.add(name)
            layers.append(_layer_plan(name, module, index, rule, options, recipe.quantize, recipe.target, recipe.calibration is not None))
    order = {name: index for index, (name, _) in enumerate(candidates)}
    layers.sort(key=lambda layer: order[layer.name])  # module order, whichever rule claimed them
    return Plan(_resolve_ties(model, layers), skipped)


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
    dense = not rule.implementation.factorizing
    if config is None or config.rounding is not Rounding.GPTQ or kind is LayerKind.LINEAR and (dense or budgeted):
        return config
    if isinstance(rule.quantize, QuantizeConfig):
        what = f"a {kind.value}" if kind is not LayerKind.LINEAR else f"stored as {rule.method} factors"
        raise SpecError(f"spec.recipe.rules[{index}].quantize.rounding",
                        f"gptq rounds dense Linear weights (method none); {name} is {what}: use rounding nearest")  # fmt: skip
    return config.nearest()


def _layer_plan(name: str, module: nn.Module, index: int, rule: Rule, options: Any, default_quantize: QuantizeConfig | None,
                target: Target | None = None, calibration_set: bool = False) -> LayerPlan:  # fmt: skip
    kind = module_kind(module)
    assert kind is not None
    method = rule.implementation
    if kind not in method.kinds:
        allowed = ", ".join(k.value for k in method.kinds)
        raise SpecError(f"spec.recipe.rules[{index}].method", f"{rule.method} applies to {allowed}, but {name} is a {kind.value}")
    if (reason := method.refuse(name, module)) is not None:
        raise SpecError(f"spec.recipe.rules[{index}].method", reason)
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
        max_error=rule.max_error,
        form=rule.form,
        options=options,
        calibration_set=calibration_set,
    )
    if rule.rank is not None and rule.rank.fixed is not None:
        check_fixed_rank(plan, rule.rank.fixed)
    return plan


def factorised_params(plan: LayerPlan, rank: int) -> int:
    """Weight parameters after factorising at one rank (bond dimension for tt, both channel ranks for tucker)."""
    method = plan.implementation
    return method.params_for_ranks(plan, method.ranks_for(plan, rank))


def largest_saving_rank(plan: LayerPlan) -> int:
    """The break-even rank: the largest one that still stores fewer numbers than the dense weight."""
    return plan.implementation.largest_saving_rank(plan)


def check_fixed_rank(plan: LayerPlan, rank: int) -> None:
    field = f"{plan.field}.rank.fixed"
    shape = "x".join(map(str, plan.weight_shape))
    cap = plan.implementation.max_rank(plan)
    if cap is not None and rank > cap:
        raise SpecError(field, f"rank {rank} exceeds the largest possible rank {cap} of {plan.name} ({shape})")
    if rank > largest_saving_rank(plan):
        raise SpecError(field, f"rank {rank} {saving_problem(plan, factorised_params(plan, rank))}")


def saving_problem(plan: LayerPlan, params: int) -> str:
    """Why a factorisation is refused: it stores at least as many numbers as the dense weight."""
    shape = "x".join(map(str, plan.weight_shape))
    return (
        f"does not reduce {plan.name} ({shape}): {plan.method} would store {params:,} numbers vs "
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
        if layer.factorized or first.factorized or _layout(layer.quantize) != _layout(first.quantize):
            raise SpecError(
                f"{layer.field}.method",
                f"{layer.name} shares its weight with {first.name}; tied weights can only be quantized alike "
                f"(method none and the same quantize for both)",
            )
        # it stores nothing of its own: it reads the owner's weight, however that was rounded
        resolved.append(LayerPlan(**{**layer.__dict__, "tied_to": first.name, "quantize": first.quantize}))
    _refuse_broken_ties(model, resolved)
    return resolved


def _refuse_broken_ties(model: nn.Module, layers: list[LayerPlan]) -> None:
    """A layer whose weight another module also uses, where that module is not in the plan: replacing one side
    would store the weight twice and let the two drift apart."""
    planned = {layer.name for layer in layers}
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    for layer in layers:
        if not layer.factorized and layer.quantize is None:
            continue  # left exactly as it is: the tie stays
        others = [n for n in users.get(id(model.get_submodule(layer.name).weight), []) if n not in planned]
        if others:
            kind = type(model.get_submodule(others[0])).__name__
            raise SpecError(f"{layer.field}.match", f"{layer.name} shares its weight with {others[0]} ({kind}), which no rule "
                            "selects; select both alike (method none, the same quantize) or neither, or the weight "
                            "would be stored twice")  # fmt: skip


def _layout(config: QuantizeConfig | None) -> QuantizeConfig | None:
    return None if config is None else config.nearest()
