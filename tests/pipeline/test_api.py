"""The Python API on models held in memory: a transformers model and its tokenizer, or a plain module."""

from __future__ import annotations

import doctest
import re

import pytest
import torch
from torch import nn

import krunch
import krunch.api
from krunch.data.similarity import lee_documents
from krunch.errors import KrunchError
from krunch.sizes import tensor_bytes
from krunch.runtime.quantized import QuantizedLinear
from krunch.runtime.linear import LowRankLinear, PivotedLowRankLinear

INT8 = {"rules": [{"match": "encoder.*", "method": "none"}], "quantize": {"bits": 8}}
FFN = "encoder.layer.*.intermediate.dense"


def sentences(documents: list[str]) -> list[str]:
    return [s.strip() for doc in documents for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) > 4]


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    """Calibration sentences and held-out sentences from different documents."""
    documents = lee_documents()
    return sentences(documents[:25])[:96], sentences(documents[25:])[:48]


def embeddings(module: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = module(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_the_docstring_example_runs():
    result = doctest.testmod(krunch.api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


def test_int8_on_an_in_memory_encoder_leaves_the_original_alone(minilm, texts):
    module, tokenizer = minilm.module, minilm.tokenizer
    before = {name: p.clone() for name, p in module.named_parameters()}
    result = krunch.compress(module, INT8, progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in result.module.modules()) == 36
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())  # a copy was compressed
    cosine = (embeddings(result.module, tokenizer, texts[1]) * embeddings(module, tokenizer, texts[1])).sum(-1)
    assert cosine.min() > 0.99
    assert {row["name"] for row in result.layers()} >= {"encoder.layer.0.attention.self.query"}


def test_inplace_swaps_the_layers_into_the_model_itself_and_gives_the_copy_s_outputs(minilm, texts):
    """No second copy of the model: the given module is the result, its Linears replaced, its outputs those
    of compressing a copy; the source's sizes are the original's; healing (the original is its teacher) is refused."""
    import copy

    own = copy.deepcopy(minilm.module)
    copied = krunch.compress(minilm.module, INT8, progress=False)
    result = krunch.compress(own, INT8, progress=False, inplace=True)
    assert result.module is own
    assert sum(isinstance(m, QuantizedLinear) for m in own.modules()) == 36
    assert (result.source_params, result.source_bytes) == (copied.source_params, copied.source_bytes)
    assert result.source_bytes > tensor_bytes(own)  # counted before the fp32 layers went
    assert torch.equal(embeddings(own, minilm.tokenizer, texts[1]), embeddings(copied.module, minilm.tokenizer, texts[1]))
    with pytest.raises(KrunchError, match="inplace.*heal"):
        krunch.compress(minilm.module, {**INT8, "heal": {"steps": 1}}, calibration=texts[0], progress=False, inplace=True)


def test_activation_aware_svd_fits_the_sentences_it_is_given(minilm, texts):
    module, tokenizer = minilm.module, minilm.tokenizer
    calibration, held_out = texts
    rule = {"match": FFN, "method": "svd", "rank": {"fixed": 96}, "form": "factors"}
    aware = krunch.compress(module, {"rules": [{**rule, "activationAware": True}]}, calibration=calibration,
                            tokenizer=tokenizer, progress=False)  # fmt: skip
    plain = krunch.compress(module, {"rules": [rule]}, progress=False)
    assert isinstance(aware.module.encoder.layer[0].intermediate.dense, LowRankLinear)
    reference = embeddings(module, tokenizer, held_out)
    aware_cos = (embeddings(aware.module, tokenizer, held_out) * reference).sum(-1).mean()
    plain_cos = (embeddings(plain.module, tokenizer, held_out) * reference).sum(-1).mean()
    assert aware_cos > plain_cos + 0.01, (float(aware_cos), float(plain_cos))


def test_a_recipe_as_yaml_text_and_bad_recipes_name_the_field(minilm):
    yaml_recipe = "rules:\n  - {match: 'encoder.layer.0.*', method: svd, rank: {fixed: 16}}\n"
    result = krunch.compress(minilm.module, yaml_recipe, progress=False)
    assert isinstance(result.module.encoder.layer[0].intermediate.dense, PivotedLowRankLinear)
    with pytest.raises(KrunchError, match=r"recipe\.rules\[0\]\.method: unknown method 'magic'; choose one of 'none', 'svd'"):
        krunch.compress(minilm.module, {"rules": [{"match": "*", "method": "magic"}]})
    with pytest.raises(KrunchError, match="calibration"):
        krunch.compress(nn.Sequential(nn.Linear(32, 32)), {"rules": [{"match": "*", "method": "svd", "activationAware": True, "rank": {"fixed": 8}}]})


def test_save_and_load_an_in_memory_transformers_model(minilm, texts, tmp_path):
    result = krunch.compress(minilm.module, INT8, progress=False)
    krunch.save(result, tmp_path / "out")
    loaded = krunch.load(tmp_path / "out")
    assert isinstance(loaded.encoder.layer[0].attention.self.query, QuantizedLinear)
    # built without weights and filled from the file: no fp32 copy of a quantized weight, nothing left on meta
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert tensor_bytes(loaded) < 0.7 * tensor_bytes(minilm.module)  # linears int8 (a quarter), embeddings fp32 (half the model)
    batch = minilm.tokenizer(texts[1][:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, result.module(**batch).last_hidden_state)


def test_a_plain_module_loads_into_an_instance_the_caller_gives(tmp_path):
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # noqa: E731
    result = krunch.compress(build(), {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 4, "groupSize": 32}}, progress=False)
    krunch.save(result, tmp_path / "out")
    with pytest.raises(KrunchError, match=r"model=\.\.\."):
        krunch.load(tmp_path / "out")
    loaded = krunch.load(tmp_path / "out", model=build())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module(x))


@pytest.mark.slow
def test_int8_on_an_in_memory_causal_lm_generates_like_the_original(smollm2):
    module, tokenizer = smollm2.module, smollm2.tokenizer
    recipe = {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}}  # decoder, embedding, tied head
    result = krunch.compress(module, recipe, tokenizer=tokenizer, progress=False)
    assert result.tied == {"lm_head": "model.embed_tokens"}
    assert result.module.lm_head.weight_q is result.module.model.embed_tokens.weight_q  # stored once
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = module.generate(**prompt, max_new_tokens=8, do_sample=False)
        got = result.module.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert got[0, : prompt["input_ids"].shape[1] + 4].tolist() == expected[0, : prompt["input_ids"].shape[1] + 4].tolist()
    perplexity = krunch.evaluate(result.module, "perplexity", tokenizer=tokenizer, data="wikipedia", tokens=1024)
    baseline = krunch.evaluate(module, "perplexity", tokenizer=tokenizer, data="wikipedia", tokens=1024)
    assert perplexity["perplexity"] < baseline["perplexity"] * 1.02
