"""Each evaluator on the real models: the baseline figures, and a degraded model scoring worse."""

from __future__ import annotations

import copy

import pytest
import torch

from krunch.evaluation import EvalOptions, Task, evaluate
from krunch.model import LoadedModel

pytestmark = pytest.mark.slow


def degraded(model: LoadedModel, module_name: str, noise: float) -> LoadedModel:
    """A copy with Gaussian noise on one module's weight: a stand-in for a bad compression."""
    broken = copy.deepcopy(model)
    weight = broken.module.get_submodule(module_name).weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * noise)
    broken.reference = f"{model.reference}+noise"
    return broken


def test_smollm2_perplexity_on_the_default_wikipedia_slice(smollm2):
    metrics = evaluate(smollm2, Task.PERPLEXITY)
    assert 20 < metrics["perplexity"] < 24
    assert metrics["tokens"] == 4096 and metrics["windows"] == 8
    assert metrics["tokens_per_s"] > 0 and metrics["threads"] >= 1


def test_perplexity_on_a_user_text_file(smollm2, tmp_path):
    text = tmp_path / "story.txt"
    paragraph = "The quick brown fox jumps over the lazy dog. " * 40
    text.write_text(f"{paragraph}\n\n{paragraph}\n\n{paragraph}")
    metrics = evaluate(smollm2, Task.PERPLEXITY, EvalOptions(data=f"file:{text}", tokens=512))
    assert metrics["data"] == f"file:{text}" and metrics["windows"] == 1
    assert metrics["perplexity"] < 3  # a repeated sentence is nearly free to predict


def test_minilm_embedding_matches_the_published_baselines(minilm):
    metrics = evaluate(minilm, Task.EMBEDDING)
    assert metrics["lee50_pearson"] == pytest.approx(0.656, abs=0.01)
    assert metrics["wordsim353_spearman"] == pytest.approx(0.729, abs=0.01)
    assert metrics["fidelity_mean_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_embedding_fidelity_drops_for_a_damaged_model(minilm):
    broken = degraded(minilm, "encoder.layer.3.intermediate.dense", noise=3.0)
    metrics = evaluate(broken, Task.EMBEDDING, EvalOptions(), reference=minilm)
    assert metrics["reference"] == "zoo:minilm-l6"
    assert metrics["fidelity_mean_cosine"] < 0.99


def test_easyocr_reads_rendered_news_words(easyocr):
    metrics = evaluate(easyocr, Task.OCR)
    assert metrics["words"] == 1000
    assert metrics["word_accuracy"] >= 0.97
    assert metrics["character_error_rate"] < 0.01


def test_ocr_accuracy_falls_when_the_recognizer_is_damaged(easyocr):
    broken = degraded(easyocr, "Prediction", noise=2.0)
    metrics = evaluate(broken, Task.OCR, EvalOptions(items=200))
    assert metrics["word_accuracy"] < 0.9


def test_mobilenet_agrees_with_itself_and_not_with_a_damaged_copy(mobilenet):
    same = evaluate(mobilenet, Task.IMAGE_AGREEMENT)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == 0.0 and same["images"] == 100
    broken = degraded(mobilenet, "classifier.1", noise=1.0)
    different = evaluate(broken, Task.IMAGE_AGREEMENT, EvalOptions(items=30), reference=mobilenet)
    assert different["top1_agreement"] < 1.0 and different["mean_kl"] > 0.01
