"""The pure pieces of the evaluators, on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch

from krunch.errors import KrunchError
from krunch.evaluation import EvalOptions, Task, evaluate, parse_task
from krunch.evaluation.ocr import edit_distance, greedy_ctc_decode, pad_right_replicating
from krunch.model import LoadedModel, ModelKind


def one_hot_path(path: list[int], classes: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([path]), classes).float()


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    charset = "abcd"
    assert greedy_ctc_decode(one_hot_path([1, 1, 0, 1, 2, 2, 0, 0, 3]), charset) == ["aabc"]
    assert greedy_ctc_decode(one_hot_path([0, 0, 0]), charset) == [""]


@pytest.mark.parametrize(("a", "b", "distance"), [("kitten", "sitting", 3), ("", "abc", 3), ("same", "same", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance


def test_padding_repeats_the_last_column():
    narrow = torch.tensor([[[1.0, 2.0]]])
    wide = torch.zeros(1, 1, 4)
    batch = pad_right_replicating([narrow, wide])
    assert batch.shape == (2, 1, 1, 4)
    assert batch[0, 0, 0].tolist() == [1.0, 2.0, 2.0, 2.0]


def test_task_names_and_kind_checks():
    assert parse_task("ocr") is Task.OCR
    with pytest.raises(KrunchError, match="--task: unknown task 'bleu'; choose one of perplexity"):
        parse_task("bleu")
    image_model = LoadedModel("zoo:x", torch.nn.Linear(2, 2), kind=ModelKind.IMAGE_CLASSIFIER)
    with pytest.raises(KrunchError, match="task perplexity needs a causal-lm model, this is a image-classifier"):
        evaluate(image_model, Task.PERPLEXITY)
    bare = LoadedModel("file:x", torch.nn.Linear(2, 2))
    with pytest.raises(KrunchError, match="compares with a reference model; give one"):
        evaluate(bare, Task.IMAGE_AGREEMENT, EvalOptions())
