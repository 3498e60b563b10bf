"""Calibration batches on real tokenizers: shaped like the inputs the model sees in use, drawn once each from
the calibration half of the text."""

from __future__ import annotations

import pytest
import torch

from krunch.calibration.grams import calibration_batches
from krunch.data.text import Split, token_slice
from krunch.spec import Calibration

pytestmark = pytest.mark.slow


def test_sentence_embedder_windows_vary_in_length_and_carry_cls_and_sep(minilm):
    batches = [kwargs["input_ids"] for _, kwargs in calibration_batches(minilm, Calibration(tokens=2048))]
    assert [tuple(ids.shape) for ids in batches] == [(16, 32), (8, 64), (4, 128), (2, 256), (2, 32)]  # 60 left: 2 rows
    rows = [row for ids in batches for row in ids.tolist()]
    tokenizer = minilm.tokenizer
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in rows)
    text = [token for row in rows for token in row[1:-1]]
    assert text == token_slice(tokenizer, "wikipedia", Split.CALIBRATION, 2048)[: len(text)]  # each token once, in order
    few = [kwargs["input_ids"].shape for _, kwargs in calibration_batches(minilm, Calibration(tokens=100))]
    assert few == [(3, 32)]  # a budget smaller than one batch still calibrates
    assert all(torch.equal(kwargs["attention_mask"], torch.ones_like(kwargs["input_ids"]))
               for _, kwargs in calibration_batches(minilm, Calibration(tokens=2048)))  # fmt: skip


def test_causal_lm_windows_are_plain_text(smollm2):
    batches = [kwargs["input_ids"] for _, kwargs in calibration_batches(smollm2, Calibration(tokens=1100))]
    assert [tuple(ids.shape) for ids in batches] == [(1, 512), (1, 512)]
    ids = token_slice(smollm2.tokenizer, "wikipedia", Split.CALIBRATION, 1100)
    assert torch.cat(batches, dim=1)[0].tolist() == ids[:1024]


def test_conv_input_rows_are_the_patches_its_kernel_multiplies(easyocr):
    """A Conv2d's Gram is over its input patches, in the order of weight.reshape(out, -1): the conv's output
    is that matrix times the rows, at every position (stride and padding included)."""
    from krunch.calibration.grams import input_rows

    conv = easyocr.module.FeatureExtraction.ConvNet[3]
    strided = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
    for layer in (conv, strided):
        x = torch.randn(3, 32, 16, 40)
        with torch.no_grad():
            expected = layer(x) - (layer.bias[None, :, None, None] if layer.bias is not None else 0)
            rows = input_rows(layer, x) @ layer.weight.reshape(layer.out_channels, -1).T
        n, c, h, w = expected.shape
        assert torch.allclose(rows.reshape(n, h, w, c).permute(0, 3, 1, 2), expected, atol=1e-4)
