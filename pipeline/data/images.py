"""Photos bundled with scikit-image, scikit-learn and matplotlib, and fixed crops of them.

No labelled ImageNet data exists offline, so image models are compared with a
reference model's predictions on the same crops (top-1 agreement, KL).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image

from krunch.data.bundled import package_root
from krunch.errors import DataError

_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
DEFAULT_CROPS_PER_PHOTO = 9


def photo_paths() -> list[Path]:
    paths = [package_root(package) / relative for package, relative in _PHOTOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(missing[0], "bundled photo is missing; reinstall scikit-image, scikit-learn and matplotlib")
    return paths


def random_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A box covering 20-100% of the area with aspect ratio 3:4 to 4:3 (Inception-style)."""
    for _ in range(20):
        area = width * height * rng.uniform(0.2, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2


def photo_crops(crops_per_photo: int = DEFAULT_CROPS_PER_PHOTO, seed: int = 0) -> list[Image.Image]:
    """Each whole photo plus `crops_per_photo` seeded random crops of it (100 images by default)."""
    rng = random.Random(seed)
    images = []
    for path in photo_paths():
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
        images.append(photo)
        images.extend(photo.crop(random_crop_box(*photo.size, rng)) for _ in range(crops_per_photo))
    return images
