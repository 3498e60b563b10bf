"""A factory's bare module says what it is in the job: `spec.model.kind`, `spec.model.preprocessing` and
`spec.evaluation.reference`, checked before any work. Real MobileNetV2 weights, saved as a `file:` source
whose factory builds a plain nn.Module (no kind, no input pipeline of its own)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import krunch
from krunch.data.transforms import ImagePreprocess, imagenet_preprocess
from krunch.errors import KrunchError
from krunch.execution.executors import InProcessExecutor
from krunch.model import ModelKind
from krunch.run import evaluation_task, job_reference, load_source, run_compression
from krunch.sources.stated import transform
from krunch.spec import MODEL_KINDS, Preprocessing, SpecError, parse_job

FACTORY = "krunch.architectures.mobilenet_v2:MobileNetV2"
CLASSIFIER_SVD = {"rules": [{"match": "classifier.1", "method": "svd", "activationAware": True, "rank": {"fixed": 256}}],
                  "calibration": {"items": 32}}  # fmt: skip


@pytest.fixture(scope="module")
def weights_file(mobilenet, tmp_path_factory):
    path = tmp_path_factory.mktemp("byo") / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in mobilenet.module.state_dict().items()}, str(path))
    return path


def job(model: dict, evaluation: dict | None = None, recipe: dict | None = None):
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "byo"},
                      "spec": {"model": model, "recipe": recipe or CLASSIFIER_SVD,
                               "evaluation": evaluation or {"task": "image-agreement", "items": 40}}})  # fmt: skip


def test_a_stated_image_classifier_is_calibrated_and_evaluated(weights_file, tmp_path):
    document = {"source": f"file:{weights_file}", "factory": FACTORY, "kind": "image-classifier",
                "preprocessing": {"resize": 240, "crop": 224}}  # fmt: skip
    model = load_source(job(document))
    assert model.kind is ModelKind.IMAGE_CLASSIFIER and model.preprocess == ImagePreprocess(resize=240, crop=224)
    report = run_compression(job(document), tmp_path / "out", executor=InProcessExecutor()).report
    assert report["metrics_before"]["top1_agreement"] == 1.0 and report["metrics_before"]["reference"] == "self"
    assert 0.5 < report["metrics_after"]["top1_agreement"] < 1.0
    assert report["layers"][0]["rank"] == 256


def test_the_reference_field_names_what_the_model_is_compared_with(weights_file, mobilenet):
    stated = job({"source": f"file:{weights_file}", "factory": FACTORY, "kind": "image-classifier"},
                 {"task": "image-agreement", "items": 20, "reference": {"source": "zoo:mobilenet-v2"}})  # fmt: skip
    model = load_source(stated)
    reference = job_reference(stated, model, evaluation_task(stated, model))
    assert reference.reference == "zoo:mobilenet-v2" and reference.kind is ModelKind.IMAGE_CLASSIFIER
    metrics = krunch.evaluate(model, "image-agreement", reference=reference, items=20)
    assert metrics["reference"] == "zoo:mobilenet-v2" and metrics["top1_agreement"] == 1.0  # the same weights


@pytest.mark.parametrize(("model", "evaluation", "field", "reason"), [
    ({"source": "zoo:minilm-l6", "preprocessing": {}}, {"task": "embedding"}, "spec.model.preprocessing", "applies to image classifiers"),
    ({"source": "zoo:minilm-l6", "kind": "image-classifier"}, {"task": "embedding"}, "spec.model.kind", "is a sentence-embedding, not"),
    ({"source": "FILE", "factory": FACTORY, "kind": "causal-lm"}, {"task": "perplexity"}, "spec.model.kind", "needs its tokenizer"),
    ({"source": "FILE", "factory": FACTORY, "preprocessing": {}}, None, "spec.model.preprocessing", "add kind: image-classifier"),
    ({"source": "zoo:easyocr-g2"}, {"task": "ocr", "reference": {"source": "zoo:easyocr-g2"}}, "spec.evaluation.reference",
     "compares with no reference"),
])  # fmt: skip
def test_what_a_stated_field_cannot_mean_is_refused_before_any_work(weights_file, model, evaluation, field, reason):
    model = {**model, "source": f"file:{weights_file}"} if model["source"] == "FILE" else model
    stated = job(model, evaluation, {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}})
    with pytest.raises(SpecError, match=f"{field}: .*{reason}"):
        loaded = load_source(stated)
        job_reference(stated, loaded, evaluation_task(stated, loaded))


@pytest.mark.parametrize(("preprocessing", "message"), [
    ({"resize": 200, "crop": 224}, "crop: 224 is larger than resize 200"),
    ({"grayscale": True}, "mean: 1 value"),
    ({"std": [0.2, 0.0, 0.2]}, "std: every value must be above 0"),
])  # fmt: skip
def test_bad_preprocessing_is_named_when_the_job_is_read(preprocessing, message):
    with pytest.raises(SpecError, match=message):
        job({"source": "zoo:mobilenet-v2", "preprocessing": preprocessing})
    with pytest.raises(SpecError, match="unknown kind 'cnn'"):
        job({"source": "zoo:mobilenet-v2", "kind": "cnn"})


def test_the_python_api_takes_the_kind_of_a_plain_module(mobilenet):
    from krunch.architectures.mobilenet_v2 import MobileNetV2

    module = MobileNetV2()
    module.load_state_dict(mobilenet.module.state_dict())
    with pytest.raises(KrunchError, match="pass calibration= inputs"):
        krunch.compress(module, CLASSIFIER_SVD, progress=False)  # a plain module: krunch cannot know how to feed it
    result = krunch.compress(module, CLASSIFIER_SVD, kind="image-classifier", progress=False)  # photo crops, ImageNet transform
    assert result.model.kind is ModelKind.IMAGE_CLASSIFIER and result.layers()[0]["rank"] == 256
    with pytest.raises(KrunchError, match="kind: unknown kind 'cnn'"):
        krunch.compress(module, CLASSIFIER_SVD, kind="cnn", progress=False)
    assert torch.equal(mobilenet.module.classifier[1].weight, module.classifier[1].weight)  # the original is left as it was
    against_plain = krunch.evaluate(result.model, "image-agreement", reference=module, items=20)  # fed as the model is
    assert against_plain["reference"].startswith("memory:") and 0.5 < against_plain["top1_agreement"] <= 1.0


def test_the_spec_knows_the_same_kinds_and_default_transform_as_the_runtime():
    assert MODEL_KINDS == tuple(kind.value for kind in ModelKind)  # the spec lists them without importing torch
    assert transform(Preprocessing()) == imagenet_preprocess  # the spec's defaults are the zoo's transform
