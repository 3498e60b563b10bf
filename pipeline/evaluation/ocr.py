"""Word recognition: exact-match accuracy and character error rate on rendered news words."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from krunch.architectures.crnn import EASYOCR_EN_CHARACTERS
from krunch.data.ocr_words import DEFAULT_WORD_COUNT, word_images
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, evaluator
from krunch.evaluation.timing import timed_batches
from krunch.zoo.easyocr import word_image_preprocess
from krunch.model import LoadedModel, ModelKind


def greedy_ctc_decode(logits: torch.Tensor, charset: str) -> list[str]:
    """(N, T, classes) -> strings: best class per step, repeats merged, blanks (class 0) dropped."""
    texts = []
    for path in logits.argmax(-1).tolist():
        previous, characters = 0, []
        for index in path:
            if index != previous and index != 0:
                characters.append(charset[index - 1])
            previous = index
        texts.append("".join(characters))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def pad_right_replicating(images: list[torch.Tensor]) -> torch.Tensor:
    """Batch (1, H, W_i) images to the widest, repeating each one's last column as EasyOCR does."""
    width = max(image.shape[-1] for image in images)
    return torch.stack([F.pad(image, (0, width - image.shape[-1]), mode="replicate") for image in images])


@evaluator(Task.OCR, ModelKind.TEXT_RECOGNIZER)
def word_recognition(model: LoadedModel, options: EvalOptions, reference: LoadedModel | None = None) -> Metrics:
    charset = model.charset or EASYOCR_EN_CHARACTERS
    preprocess = model.preprocess or word_image_preprocess
    samples = word_images(charset, options.items or DEFAULT_WORD_COUNT)
    # Similar widths batch together, so little padding is added.
    order = sorted(range(len(samples)), key=lambda i: samples[i].image.size[0])
    tensors = [preprocess(samples[i].image) for i in order]
    size = max(options.batch_size, 32)
    batches = [pad_right_replicating(tensors[i : i + size]) for i in range(0, len(tensors), size)]
    outputs, timing = timed_batches(lambda batch: greedy_ctc_decode(model.module(batch), charset), batches, [len(b) for b in batches])
    predictions = [text for batch in outputs for text in batch]
    labels = [samples[i].text for i in order]
    errors = sum(edit_distance(p, t) for p, t in zip(predictions, labels, strict=True))
    return {
        "word_accuracy": round(sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels), 4),
        "character_error_rate": round(errors / sum(len(t) for t in labels), 5),
        "words": len(labels),
        "words_per_s": timing["items_per_s"],
        "threads": timing["threads"],
    }
