"""Sources keep their dtype: a bf16 or fp16 checkpoint is compressed layer by layer in float32, its float
factors and untouched layers stay in the source dtype, and sizes are counted against the source's own bytes.
Tiny random-weight Llamas (with SmolLM2's real tokenizer) check the plumbing; the slow test runs a whole job
on a bf16 copy of the real SmolLM2 and compares its int8 perplexity with the fp32 source's."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import krunch
from krunch.artifact import load_compressed
from krunch.plan.size_budget import table_for
from krunch.run import run_compression
from krunch.sources import load_model
from krunch.spec import QuantizeConfig, parse_job
from krunch.plan import make_plan

RECIPE = {"rules": [{"match": "model.layers.*.mlp.*", "method": "svd", "rank": {"fixed": 8}},
                    {"match": "model.layers.*.self_attn.*", "method": "tt", "rank": {"fixed": 4}},
                    {"match": "model.embed_tokens", "method": "none", "quantize": {"bits": 8}},
                    {"match": "lm_head", "method": "none", "quantize": {"bits": 8}}]}  # fmt: skip


def tiny_llama(vocab: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_source_is_compressed_in_float32_and_stored_in_its_dtype(tmp_path, dtype):
    model = tiny_llama().to(dtype)
    result = krunch.compress(model, RECIPE, progress=False)
    compressed = result.module
    assert {p.dtype for p in compressed.parameters()} == {dtype}  # factors, norms, nothing float32 slipped in
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    rows = {row["name"]: row for row in result.layers()}
    assert set(rows["model.layers.0.mlp.up_proj"]["kernels"].values()) == {name}  # pivoted factors: core, coefficients
    assert rows["model.embed_tokens"]["kernels"] == {"weight_q": "int8pack"}
    # the error is that of the stored (rounded) factors against the source weight, measured in float32
    reference = krunch.compress(tiny_llama(), RECIPE, progress=False)
    reference_errors = {row["name"]: row["rel_error"] for row in reference.layers()}
    for layer, row in rows.items():
        assert row["rel_error"] == pytest.approx(reference_errors[layer], rel=0.05, abs=5e-3), layer
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = compressed(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert compressed.model.embed_tokens(ids).dtype == dtype
    assert result.source_dtype == str(dtype).removeprefix("torch.") and result.source_fp16_bytes == result.source_bytes

    krunch.save(result, tmp_path)
    manifest = {entry["name"]: entry for entry in json.loads((tmp_path / "manifest.json").read_text())["layers"]}
    assert manifest["model.embed_tokens"]["config"]["dtype"] == str(dtype).removeprefix("torch.")
    reloaded = krunch.load(tmp_path, model=tiny_llama().to(dtype))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_an_fp32_model_keeps_its_manifest_and_is_also_compared_with_fp16(tmp_path):
    result = krunch.compress(tiny_llama(), RECIPE, progress=False)
    krunch.save(result, tmp_path)
    manifest = {entry["name"]: entry for entry in json.loads((tmp_path / "manifest.json").read_text())["layers"]}
    assert "dtype" not in manifest["model.embed_tokens"]["config"]  # fp32 manifests as before this change
    assert result.source_dtype == "float32"
    floats = sum(p.numel() for p in tiny_llama().parameters())
    assert result.source_bytes == 4 * floats and result.source_fp16_bytes == 2 * floats


def test_the_bytes_budget_counts_a_bf16_layer_at_two_bytes_a_number():
    model = tiny_llama().to(torch.bfloat16)
    job = parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                     "spec": {"model": {"source": "zoo:smollm2-135m"},
                              "recipe": {"rules": [{"match": "model.layers.*", "method": "svd"}], "target": {"bytesRatio": 0.5}}}})  # fmt: skip
    plan = make_plan(model, job.spec.recipe)
    layer = next(p for p in plan.layers if p.name == "model.layers.0.mlp.up_proj")
    weight = model.get_submodule(layer.name).weight
    table = table_for(layer, weight, [QuantizeConfig()])
    assert table.dense_bytes == 2 * weight.numel()
    assert table.candidates[-1].label == "dense bf16"
    fp32_table = table_for(layer, weight.float(), [QuantizeConfig()])
    assert fp32_table.dense_bytes == 4 * weight.numel() and fp32_table.candidates[-1].label == "dense fp32"


def test_an_hf_directory_loads_in_its_checkpoint_dtype(tmp_path, smollm2):
    model = tiny_llama(vocab=len(smollm2.tokenizer)).to(torch.float16)
    model.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float16}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_bf16_copy_of_smollm2_compresses_to_the_fp32_sources_int8_perplexity(tmp_path, smollm2):
    source = tmp_path / "smollm2-bf16"
    state = {k: v.to(torch.bfloat16) for k, v in smollm2.module.state_dict().items()}
    smollm2.module.save_pretrained(source, state_dict=state)  # bf16 tensors under a config.json that says float32
    smollm2.tokenizer.save_pretrained(source)
    document = {"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "smollm2-bf16-int8"},
                "spec": {"model": {"source": f"hf:{source}"},
                         "recipe": {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}},
                         "evaluation": {"task": "perplexity", "data": "wikipedia", "tokens": 2048}}}  # fmt: skip
    out = tmp_path / "out"
    report = run_compression(parse_job(document), out).report
    assert report["source_dtype"] == "bfloat16" and "compression_ratio_vs_fp16" not in report
    assert report["bytes_before"] == sum(v.numel() * 2 for k, v in state.items() if k != "lm_head.weight")
    assert 1.9 < report["compression_ratio"] < 2.05  # int8 against bf16, not the 4x an fp32 count would claim
    fp32_int8 = krunch.compress(smollm2.module, document["spec"]["recipe"], progress=False)
    fp32_after = krunch.evaluate(fp32_int8.module, "perplexity", tokenizer=smollm2.tokenizer, tokens=2048)["perplexity"]
    assert float(f"{report['metrics_after']['perplexity']:.3g}") == float(f"{fp32_after:.3g}")
    reloaded = load_compressed(out)
    assert {p.dtype for p in reloaded.module.parameters()} == {torch.bfloat16}
    assert reloaded.module.model.embed_tokens.output_dtype == "bfloat16"
