"""The plan says what each layer will run on before any work (`krunch compress --dry-run`)."""

from __future__ import annotations

from torch import nn

from krunch.plan import make_plan
from krunch.report import format_plan
from krunch.spec import Recipe


def test_dry_run_names_kernels_and_ranks_that_save_no_time():
    model = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576), nn.Linear(200, 64), nn.Conv2d(3, 8, 3))
    recipe = Recipe.model_validate({"rules": [
        {"match": "0", "method": "svd", "rank": {"fixed": 500}},
        {"match": "1", "method": "svd", "rank": {"fixed": 100}},
        {"match": "*", "method": "none", "quantize": {"bits": 8}},
    ]})  # fmt: skip
    text = format_plan("toy", "memory:", make_plan(model, recipe))
    assert "rank 500 saves storage but no time: fewer multiply-adds than dense only below rank 418" in text
    assert "fewer multiply-adds than dense below rank 418" in text.split("rules[1]")[1]
    assert "kernel int8pack (int8 per channel, 200 inputs padded to 208)" in text
    assert "kernel dequantize (no quantized convolution kernel)" in text
