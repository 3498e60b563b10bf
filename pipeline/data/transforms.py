"""How a picture becomes an image model's input: resize the short side, cut a centred square, scale to
[0, 1] and normalise per channel. The zoo's ImageNet models use torchvision's classic eval transform; a
model a user brings states its own (`spec.model.preprocessing`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocess:
    """A callable PIL image -> (channels, crop, crop) float tensor."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from PIL import Image  # the zoo extra's; a model that never sees an image loads without it

        image = image.convert("L" if self.grayscale else "RGB")
        width, height = image.size
        scale = self.resize / min(width, height)
        image = image.resize((max(self.crop, round(width * scale)), max(self.crop, round(height * scale))), Image.BILINEAR)
        width, height = image.size
        left, top = (width - self.crop) // 2, (height - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        channels = 1 if self.grayscale else 3
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(self.crop, self.crop, channels)
        tensor = pixels.permute(2, 0, 1).float() / 255.0
        return (tensor - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)


imagenet_preprocess = ImagePreprocess()  # torchvision's: short side 256, centre crop 224, ImageNet mean/std
