"""Planning on the real SmolLM2 module tree: rule matching, ties, and refusals before any work."""

from __future__ import annotations

import pytest

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
