"""What a loaded model is: the module plus everything needed to feed it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelKind(enum.Enum):
    """The interface a model offers, which decides how evaluators feed it."""

    CAUSAL_LM = "causal-lm"
    SENTENCE_EMBEDDING = "sentence-embedding"
    TEXT_RECOGNIZER = "text-recognizer"
    IMAGE_CLASSIFIER = "image-classifier"


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer or preprocessing.

    `kind` is None for a bare module built by a user's factory: the evaluation
    task then decides how to feed it, with that task's standard preprocessing.
    """

    reference: str
    module: nn.Module
    kind: ModelKind | None = None
    tokenizer: Any = None
    preprocess: Callable[[Any], torch.Tensor] | None = None
    charset: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # safetensors files the module's state dict was loaded from, key for key, unchanged: layer tasks
    # on Ray read their own tensors from them instead of receiving copies from the driver
    weight_files: tuple[Path, ...] = ()
    # inputs the caller gave for calibration ((args, kwargs) per batch): used instead of a corpus
    calibration_inputs: list[tuple[tuple, dict]] | None = None

    def __post_init__(self) -> None:
        self.module.eval()

    @property
    def parameter_count(self) -> int:
        """Distinct stored numbers: tied weights (an embedding reused as LM head) once, each quantized value
        as one (quantized weights are buffers, so counting nn.Parameters alone would miss them)."""
        from krunch.sizes import count_params

        return count_params(self.module)
