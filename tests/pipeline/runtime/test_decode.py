"""compile_decode: `generate` runs its decode steps on a compiled graph over the quantized kernels and
gives what eager decoding gives. A small random-weight Llama keeps the compile short: this checks the
plumbing; the speed is measured by scripts/bench_inference.py on SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import krunch
from krunch.runtime import Kernel, compile_decode


@pytest.fixture(scope="module")
def quantized_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    result = krunch.compress(model, {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}}, progress=False)
    return result.module


def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip


def test_compiled_decode_gives_the_eager_tokens_on_the_quantized_kernels(quantized_llama):
    prompt = torch.randint(1, 256, (1, 12))
    eager = greedy(quantized_llama, prompt, 6)
    assert quantized_llama.model.layers[0].mlp.up_proj.weight_q.kernel()[0] is Kernel.INT8_CPU
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
