"""A model whose tokenizer adds a BOS reads its BOS first in perplexity windows and calibration batches,
as it does in use: raw token slices without it score such a model several times too high and fit its
layers to inputs it never sees. A small random-weight Llama with a real transformers tokenizer checks
the windows; SmolLM2's tokenizer adds no BOS, so its figures do not move."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import krunch
from krunch.api import as_loaded
from krunch.data.text import special_tokens
from krunch.sources.stated import describe_inputs

BOS = 1


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """One id per printable character, and `<bos>` before every text, as Llama's and Gemma's tokenizers do."""
    vocab = {"<pad>": 0, "<bos>": BOS, "<unk>": 2} | {chr(c): c for c in range(32, 127)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def bos_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=BOS)  # fmt: skip
    return LlamaForCausalLM(config).eval(), bos_tokenizer()


def windows_seen(model: torch.nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):  # noqa: ANN001, ANN202
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 8:  # not the decode steps of the speed measurement
            seen.append(ids)

    # on the decoder: perplexity runs it and the LM head apart, every other forward runs it inside the model
    return seen, model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)


def test_the_special_tokens_are_read_from_the_tokenizer_and_shown_before_any_work(bos_model, minilm, smollm2):
    assert special_tokens(bos_model[1]) == ([BOS], [])
    assert special_tokens(minilm.tokenizer) == ([minilm.tokenizer.cls_token_id], [minilm.tokenizer.sep_token_id])
    assert special_tokens(smollm2.tokenizer) == ([], [])  # SmolLM2 adds none: its windows are as before
    assert describe_inputs(as_loaded(*bos_model)) == "  inputs: causal-lm; text windows wrapped in ['<bos>']"  # --dry-run's line
    assert describe_inputs(minilm).endswith("wrapped in ['[CLS]', '[SEP]']")
    assert describe_inputs(smollm2).endswith("as raw tokens (the tokenizer adds no special tokens)")


def test_perplexity_windows_start_with_the_bos(bos_model):
    model, tokenizer = bos_model
    seen, hook = windows_seen(model)
    try:
        metrics = krunch.evaluate(model, "perplexity", tokenizer=tokenizer, data="wikipedia", tokens=1024)
    finally:
        hook.remove()
    assert metrics["windows"] == 2
    windows = seen[:2]  # then the speed measurement's own forwards
    assert all(w.shape == (1, 512) for w in windows)
    assert all(int(w[0, 0]) == BOS and BOS not in w[0, 1:].tolist() for w in windows)
    assert metrics["leading_special_tokens"] == [BOS]
    first_text = tokenizer("Anarchism", add_special_tokens=False)["input_ids"]
    assert seen[0][0, 1 : 1 + len(first_text)].tolist() == first_text  # then the text, from its start


def test_calibration_batches_start_with_the_bos(bos_model):
    model, tokenizer = bos_model
    seen, hook = windows_seen(model)
    recipe = {"rules": [{"match": "model.layers.*.mlp.*", "method": "svd", "activationAware": True, "rank": {"fixed": 8}}],
              "calibration": {"data": "wikipedia", "tokens": 1024}}  # fmt: skip
    try:
        krunch.compress(model, recipe, tokenizer=tokenizer, progress=False)
    finally:
        hook.remove()
    assert seen and all((batch[:, 0] == BOS).all() for batch in seen)
    assert all(BOS not in batch[:, 1:].flatten().tolist() for batch in seen)
