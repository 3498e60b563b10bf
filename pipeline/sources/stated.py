"""A job's model and reference as the job states them: a factory's bare module has no kind and no input
pipeline, so `spec.model.kind` and `spec.model.preprocessing` say them, checked before any work."""

from __future__ import annotations

from krunch.data.transforms import ImagePreprocess, imagenet_preprocess
from krunch.errors import KrunchError
from krunch.model import LoadedModel, ModelKind
from krunch.sources import load_model
from krunch.spec import ModelSource, Preprocessing, SpecError

NEEDS_TOKENIZER = (ModelKind.CAUSAL_LM, ModelKind.SENTENCE_EMBEDDING)


def stated(model: LoadedModel, source: ModelSource, field: str) -> LoadedModel:
    """`model` with the kind and preprocessing `source` states (field: where they are, for errors)."""
    if source.kind is not None:
        kind = ModelKind(source.kind)
        if model.kind is not None and model.kind is not kind:
            raise SpecError(f"{field}.kind", f"{source.source} is a {model.kind.value}, not a {kind.value}")
        if kind in NEEDS_TOKENIZER and model.tokenizer is None:
            raise SpecError(f"{field}.kind", f"a {kind.value} needs its tokenizer, which {source.source} does not come with "
                            "(load it from a Hugging Face directory: hf:DIR)")  # fmt: skip
        if kind is ModelKind.TEXT_RECOGNIZER and model.charset is None:
            raise SpecError(f"{field}.kind", f"a {kind.value} needs its character set, which {source.source} does not come with")
        model.kind = kind
    if model.kind is ModelKind.IMAGE_CLASSIFIER and model.preprocess is None:
        model.preprocess = imagenet_preprocess
    if source.preprocessing is not None:
        if model.kind is not ModelKind.IMAGE_CLASSIFIER:
            what = model.kind.value if model.kind else "a module of no stated kind"
            raise SpecError(f"{field}.preprocessing", f"applies to image classifiers; {source.source} is {what} "
                            "(a factory's module: add kind: image-classifier)")  # fmt: skip
        model.preprocess = transform(source.preprocessing)
    return model


def transform(preprocessing: Preprocessing) -> ImagePreprocess:
    """The callable a job's `preprocessing` section describes."""
    p = preprocessing
    return ImagePreprocess(p.resize, p.crop, tuple(p.mean), tuple(p.std), p.grayscale)


def load_stated(source: ModelSource, field: str) -> LoadedModel:
    try:
        model = load_model(source.source, source.factory)
    except KrunchError as err:
        raise SpecError(f"{field}.source", str(err)) from None
    return stated(model, source, field)


def load_reference(reference: ModelSource | None, model: LoadedModel, needs_reference: bool, task: str) -> LoadedModel:
    """What the evaluation compares with: `spec.evaluation.reference`, or the source model itself. A reference of
    no stated kind is fed as the model is (its kind and preprocessing)."""
    if reference is None:
        return model
    field = "spec.evaluation.reference"
    if not needs_reference:
        raise SpecError(field, f"the {task} task compares with no reference model")
    loaded = load_stated(reference, field)
    if loaded.kind is None:
        loaded.kind = model.kind
    if loaded.preprocess is None:
        loaded.preprocess = model.preprocess
    if loaded.kind is not model.kind:
        raise SpecError(f"{field}.source", f"{reference.source} is a {loaded.kind.value if loaded.kind else 'module of no kind'}, "
                        f"the model a {model.kind.value if model.kind else 'module of no kind'}")  # fmt: skip
    return loaded


def describe_inputs(model: LoadedModel) -> str:
    """How calibration and evaluation will feed the model (`--dry-run`): its kind, and the special tokens
    around text windows or the picture transform."""
    if model.kind is None:
        return "  inputs: a module of no stated kind: calibration needs spec.model.kind (or calibration= inputs in Python)"
    line = f"  inputs: {model.kind.value}"
    if model.tokenizer is not None:
        from krunch.data.text import special_tokens

        first, last = special_tokens(model.tokenizer)
        if model.kind is ModelKind.CAUSAL_LM:
            last = []
        names = model.tokenizer.convert_ids_to_tokens(first + last) if first or last else []
        line += f"; text windows wrapped in {names}" if names else "; text windows as raw tokens (the tokenizer adds no special tokens)"
    elif isinstance(model.preprocess, ImagePreprocess):
        p = model.preprocess
        line += f"; pictures resized to {p.resize}, centre crop {p.crop}, mean {list(p.mean)}, std {list(p.std)}"
    return line
