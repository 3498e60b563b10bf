"""compile_decode and greedy_decode: decode steps on a compiled graph over the quantized kernels give the
tokens eager `generate` gives, and single-token attention as matmuls gives SDPA's output. A small
random-weight Llama keeps the compile short: this checks the plumbing; the speed is measured by
scripts/bench_inference.py on SmolLM2. Its weights are int4, whose kernel runs in compiled steps as in eager:
a compiled one-row int8 matmul is an fp32 reduction (test_kernels.py), more exact than the eager kernel, and
a random model's near-tied logits would then pick other tokens."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import krunch
from krunch.runtime import Kernel, compile_decode, greedy_decode, set_exact
from krunch.runtime.decode import DECODE_ATTENTION, decode_attention


@pytest.fixture(scope="module")
def quantized_llama():
    return tiny_quantized_llama(seed=0)


def tiny_quantized_llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    recipe = {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 4, "groupSize": 32}}
    result = krunch.compress(model, recipe, progress=False)
    return result.module


def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip


def test_compiled_decode_gives_the_eager_tokens_on_the_quantized_kernels(quantized_llama):
    prompt = torch.randint(1, 256, (1, 12))
    eager = greedy(quantized_llama, prompt, 6)
    assert quantized_llama.model.layers[0].mlp.up_proj.weight_q.kernel()[0] is Kernel.INT4_CPU
    assert quantized_llama.generation_config.compile_config is None

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_decode(quantized_llama, max_cache_len=32)
    generation = quantized_llama.generation_config
    assert (generation.cache_implementation, generation.max_cache_len, generation.compile_config.mode) == ("static", 32, "default")
    try:
        compiled = greedy(quantized_llama, prompt, 6)
        again = greedy(quantized_llama, torch.randint(1, 256, (1, 9)), 6)  # same cache size: no new graph
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        quantized_llama.generation_config.compile_config = None
        quantized_llama.generation_config.cache_implementation = None
        attention = quantized_llama.config._attn_implementation
        quantized_llama.set_attn_implementation("sdpa")
    assert attention == DECODE_ATTENTION
    assert graphs >= 1  # the decode steps ran compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs and again.sequences.shape == (1, 15)
    assert torch.equal(compiled.sequences, eager.sequences)
    for step_compiled, step_eager in zip(compiled.scores, eager.scores):
        assert torch.allclose(step_compiled, step_eager, atol=1e-3, rtol=1e-3)


def test_compile_decode_refuses_what_it_cannot_compile(quantized_llama):
    with pytest.raises(TypeError, match="Sequential"):
        compile_decode(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="max_cache_len"):
        compile_decode(quantized_llama, max_cache_len=1)


def test_single_token_attention_as_matmuls_gives_sdpa_output():
    """Grouped heads (8 query heads on 2 key/value heads), a boolean mask hiding the unwritten cache."""
    torch.manual_seed(1)
    module = nn.Module().eval()
    module.num_key_value_groups, module.is_causal = 4, True
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., :17], mask[1, ..., :33] = True, True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (2, 1, 8, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    unmasked, _ = decode_attention(module, query, key, value, None, scaling=0.25)
    assert not torch.allclose(unmasked, expected, atol=1e-3)  # the mask is what hides the rest of the cache
    longer = torch.randn(2, 8, 3, 16)  # more than one query row: SDPA itself
    assert torch.equal(decode_attention(module, longer, key, value, None)[0], sdpa_attention_forward(module, longer, key, value, None)[0])


def reference(model: nn.Module, prompt: torch.Tensor, new_tokens: int, eos: list[int] | None) -> torch.Tensor:
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.inference_mode():
        return model.generate(prompt, generation_config=config)


def test_greedy_decode_gives_the_tokens_of_generate_on_one_compiled_step(quantized_llama):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        prompt = torch.randint(1, 256, (1, 12))
        tokens = greedy_decode(quantized_llama, prompt, 10)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        other = torch.randint(1, 256, (2, 7))
        batch = greedy_decode(quantized_llama, other, 10)  # another prompt length and batch: the same cache length
        eos = int(tokens[0, 15])  # a token the model produces: generation stops there
        stopped = greedy_decode(quantized_llama, prompt, 10, eos_token_id=[255, eos])
    finally:
        quantized_llama.set_attn_implementation("sdpa")
    assert graphs >= 1 and tokens.shape == (1, 22)
    assert torch.equal(tokens, reference(quantized_llama, prompt, 10, None))
    assert torch.equal(batch, reference(quantized_llama, other, 10, None))
    assert torch.equal(stopped, reference(quantized_llama, prompt, 10, [255, eos])) and stopped.shape[1] <= 16
    assert torch.equal(greedy_decode(quantized_llama, prompt, 10, compile=False), tokens)


def test_greedy_decode_refuses_what_it_cannot_run(quantized_llama):
    prompt = torch.randint(1, 256, (1, 12))
    with pytest.raises(TypeError, match="Sequential"):
        greedy_decode(nn.Sequential(nn.Linear(4, 4)), prompt, 4)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_decode(quantized_llama, prompt[0], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(quantized_llama, prompt, 0)
    with pytest.raises(ValueError, match="max_cache_len 16 is shorter"):
        greedy_decode(quantized_llama, prompt, 8, max_cache_len=16)


def test_a_compiled_step_never_runs_another_model_or_a_changed_one():
    """The step skips dynamo's guards on the model's modules, so it must be compiled again for another model
    of the same shapes, after a kernel switch and after a layer swap: each gives its own eager tokens."""
    first, second = tiny_quantized_llama(seed=1), tiny_quantized_llama(seed=2)
    prompt = torch.randint(1, 256, (1, 12))
    try:
        tokens = {name: greedy_decode(model, prompt, 10) for name, model in [("first", first), ("second", second)]}
        assert torch.equal(tokens["first"], greedy_decode(first, prompt, 10, compile=False))
        assert torch.equal(tokens["second"], greedy_decode(second, prompt, 10, compile=False))
        assert not torch.equal(tokens["first"], tokens["second"])  # two models, two answers

        assert set_exact(first) > 0  # every weight now on the fp32 reference path
        assert torch.equal(greedy_decode(first, prompt, 10), greedy_decode(first, prompt, 10, compile=False))
        torch.manual_seed(3)
        first.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
        swapped = greedy_decode(first, prompt, 10)
        assert torch.equal(swapped, greedy_decode(first, prompt, 10, compile=False))
        assert not torch.equal(swapped, tokens["first"])
    finally:
        first.set_attn_implementation("sdpa")
        second.set_attn_implementation("sdpa")


def test_the_compiled_decode_figures_of_a_report_check_the_tokens_and_leave_attention_as_it_was():
    from krunch.evaluation.speed import DECODE_TOKENS, PREFILL_TOKENS, causal_lm_speed

    model = tiny_quantized_llama(seed=3)
    before = model.config._attn_implementation
    torch._dynamo.reset()
    figures = causal_lm_speed(model, torch.randint(1, 256, (PREFILL_TOKENS,)).tolist(), compiled_decode=True)
    assert figures["compiled_tokens_as_eager"] == DECODE_TOKENS  # the same kernels compiled: every token as eager's
    assert figures["compiled_decode_tokens_per_s"] > 0 and figures["compiled_cpu_s_per_token"] > 0
    assert model.config._attn_implementation == before != DECODE_ATTENTION  # a saved model needs no krunch attention
