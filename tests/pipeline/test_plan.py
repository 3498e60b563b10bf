"""Planning on the real SmolLM2 module tree: rule matching, ties, and refusals before any work."""

from __future__ import annotations

import pytest
from torch import nn

from krunch.plan import make_plan
from krunch.spec import Recipe, SpecError

pytestmark = pytest.mark.slow


def recipe(*rules: dict, **extra) -> Recipe:
    return Recipe.model_validate({"rules": list(rules), **extra})


def test_first_match_wins_and_unmatched_layers_are_left_alone(smollm2):
    plan = make_plan(smollm2.module, recipe(
        {"match": "model.layers.0.*", "method": "none"},
        {"match": "*.mlp.*", "method": "svd", "rank": {"fixed": 64}},
    ))  # fmt: skip
    names = {layer.name: layer for layer in plan.layers}
    assert names["model.layers.0.mlp.up_proj"].method == "none"
    assert names["model.layers.1.mlp.up_proj"].method == "svd"
    assert "model.layers.1.self_attn.q_proj" not in names and "lm_head" not in names
    assert len(plan.layers) == 7 + 29 * 3


def test_tied_embedding_and_lm_head_are_quantized_once(smollm2):
    plan = make_plan(smollm2.module, recipe({"match": "*", "method": "none"}, quantize={"bits": 8}))
    tied = [layer for layer in plan.layers if layer.tied_to]
    assert [(t.name, t.tied_to) for t in tied] == [("lm_head", "model.embed_tokens")]
    with pytest.raises(SpecError, match="shares its weight with model.embed_tokens") as caught:
        make_plan(smollm2.module, recipe(
            {"match": "lm_head", "method": "none", "quantize": {"bits": 4}},
            {"match": "*", "method": "none"},
        quantize={"bits": 8}))  # fmt: skip
    assert caught.value.subject.startswith("spec.recipe.rules[")


@pytest.mark.parametrize(
    ("rules", "path", "reason"),
    [
        ([{"match": "*.attn*", "method": "svd", "rank": {"fixed": 8}}], "spec.recipe.rules[0].match", "selects no Linear"),
        ([{"match": "*.mlp.*", "method": "none"}, {"match": "*.mlp.up_proj", "method": "svd", "rank": {"fixed": 8}}],
         "spec.recipe.rules[1].match", "earlier rule already took"),
        ([{"match": "*.mlp.*", "method": "svd", "rank": {"fixed": 600}}], "spec.recipe.rules[0].rank.fixed", "exceeds the largest possible rank 576"),
        ([{"match": "*.mlp.*", "method": "svd", "form": "factors", "rank": {"fixed": 500}}], "spec.recipe.rules[0].rank.fixed",
         "break-even rank is 418"),
        ([{"match": "*.mlp.*", "method": "svd", "rank": {"fixed": 576}}], "spec.recipe.rules[0].rank.fixed", "break-even rank is 575"),
        ([{"match": "*.mlp.*", "method": "tt", "rank": {"fixed": 200}}], "spec.recipe.rules[0].rank.fixed", "break-even rank is"),
        ([{"match": "*.mlp.*", "method": "tucker", "rank": {"fixed": 8}}], "spec.recipe.rules[0].method", "tucker applies to Conv2d"),
        ([{"match": "model.embed_tokens", "method": "svd", "rank": {"fixed": 8}}], "spec.recipe.rules[0].method", "is a Embedding"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(smollm2, rules, path, reason):
    with pytest.raises(SpecError) as caught:
        make_plan(smollm2.module, recipe(*rules))
    assert caught.value.subject == path
    assert reason in caught.value.reason


def test_a_tie_to_a_module_no_rule_selects_is_refused():
    """A tied LM head selected while its embedding is not (or is a subclass krunch does not take): replacing
    the head alone would store the weight twice."""

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    for embedding in (nn.Embedding(50, 16), ScaledEmbedding(50, 16)):
        model = nn.ModuleDict({"embed": embedding, "head": nn.Linear(16, 50, bias=False)})
        model["head"].weight = model["embed"].weight
        recipe = Recipe.model_validate({"rules": [{"match": "head", "method": "none"}], "quantize": {"bits": 8}})
        with pytest.raises(SpecError, match=r"head shares its weight with embed \((Scaled)?Embedding\), which no rule selects"):
            make_plan(model, recipe)
    plain = nn.ModuleDict({"embed": nn.Embedding(50, 16), "head": nn.Linear(16, 50, bias=False)})
    plain["head"].weight = plain["embed"].weight
    both = Recipe.model_validate({"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}})
    assert [layer.tied_to for layer in make_plan(plain, both).layers] == [None, "embed"]


class SamePaddingConv(nn.Conv2d):
    """TF-style 'same' padding applied in its own forward, as EfficientNet ports do."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class TaggedLinear(nn.Linear):
    """A subclass that changes nothing it computes: safe to replace."""


def test_subclasses_are_replaced_when_they_compute_what_their_base_does_and_reported_otherwise(caplog):
    model = nn.Sequential(SamePaddingConv(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), TaggedLinear(8, 4))
    recipe = Recipe.model_validate({"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}})
    plan = make_plan(model, recipe)
    assert [layer.name for layer in plan.layers] == ["1", "3"]
    assert plan.skipped and plan.skipped[0][0] == "0" and "SamePaddingConv subclasses Conv2d with its own forward" in plan.skipped[0][1]
    import krunch

    with caplog.at_level("WARNING", logger="krunch"):
        krunch.compress(model, recipe, progress=False)
    assert "1 module(s) left as they are (e.g. 0): SamePaddingConv subclasses Conv2d" in caplog.text
    from krunch.report import format_plan

    assert "skipped, 1 module (e.g. 0): SamePaddingConv subclasses Conv2d" in format_plan("job", "file:x", plan)
    only = Recipe.model_validate({"rules": [{"match": "0", "method": "none"}], "quantize": {"bits": 8}})
    with pytest.raises(SpecError, match="only matches modules krunch leaves as they are, e.g. 0: SamePaddingConv"):
        make_plan(model, only)
