"""Sharded checkpoints in and out: an `hf:` directory in several safetensors shards is read shard by shard
(workers locate each tensor in its shard), and a compressed model past the shard size is written in
shards with save_pretrained's index and reloads equal, tensor for tensor. Tiny random-weight Llamas: this
checks the files, not quality."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import krunch
from krunch.artifact import WEIGHTS, WEIGHTS_INDEX, weight_files
from krunch.errors import ModelSourceError
from krunch.execution.tasks import located
from krunch.streaming.store import TensorStore
from krunch.sources import load_model

RECIPE = {"rules": [{"match": "model.layers.*.mlp.*", "method": "svd", "rank": {"fixed": 8}}, {"match": "*", "method": "none"}],
          "quantize": {"bits": 8}}  # fmt: skip


def tiny_llama(vocab: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_a_compressed_model_past_the_shard_size_is_written_in_shards_and_reloads_equal(tmp_path):
    result = krunch.compress(tiny_llama(), RECIPE, progress=False)
    krunch.save(result, tmp_path, max_shard_bytes=20_000)
    shards = weight_files(tmp_path)
    assert len(shards) >= 3 and not (tmp_path / WEIGHTS).exists()
    index = json.loads((tmp_path / WEIGHTS_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    largest_tensor = max(t.numel() * t.element_size() for t in result.module.state_dict().values())
    assert all(p.stat().st_size <= max(20_000, largest_tensor) + 4096 for p in shards)  # header aside
    assert "lm_head.weight_q.values" not in index["weight_map"] or "model.embed_tokens.weight_q.values" not in index["weight_map"]

    reloaded = krunch.load(tmp_path, model=tiny_llama())
    expected, got = result.module.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert reloaded.lm_head.weight_q is reloaded.model.embed_tokens.weight_q  # the tie is restored, stored once

    krunch.save(result, tmp_path)  # under the default 2 GB: one file again, no stale shard left to mix in
    assert weight_files(tmp_path) == [tmp_path / WEIGHTS] and not list(tmp_path.glob("model-*.safetensors"))


def test_a_shard_index_naming_files_outside_the_directory_is_refused(tmp_path):
    krunch.save(krunch.compress(tiny_llama(), RECIPE, progress=False), tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / WEIGHTS_INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (tmp_path / WEIGHTS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match="shard '../elsewhere.safetensors' is not a .safetensors file name"):
        krunch.load(tmp_path, model=tiny_llama())
    (tmp_path / WEIGHTS_INDEX).write_text("{not json")
    with pytest.raises(ModelSourceError, match=f"{WEIGHTS_INDEX} is not a weight index"):
        krunch.load(tmp_path, model=tiny_llama())


def test_a_sharded_hf_checkpoint_is_read_shard_by_shard(tmp_path, smollm2):
    model = tiny_llama(vocab=len(smollm2.tokenizer))
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    smollm2.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_INDEX).is_file()
    loaded = load_model(f"hf:{tmp_path}")
    assert len(loaded.weight_files) >= 2
    store = TensorStore(loaded.weight_files)  # what remote layer tasks read their tensors through
    files = set()
    for name, parameter in loaded.module.named_parameters():
        if name == "lm_head.weight":
            continue  # tied: stored once, as the embedding
        found = located(store, name, tuple(parameter.shape))
        assert found is not None, name
        assert torch.equal(found.read(), model.state_dict()[name])
        files.add(found.path)
    assert len(files) == len(loaded.weight_files)  # every shard holds some of them
    ids = torch.randint(0, len(smollm2.tokenizer), (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded.module(ids).logits, model(ids).logits)
