"""What a finished job hands on: its report (report.json, typed) and the compressed model. The registry and
the human summary read these types, never the compression stage that produced them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    from krunch.model import LoadedModel

REPORT = "report.json"
BUDGET = "budget.json"  # target.bytesRatio: every layer's candidates and the one chosen


class LayerRow(TypedDict):
    """One selected layer: what was done to it and what it now runs on."""

    name: str
    method: str
    rank: int | list[int] | None
    params_before: int
    params_after: int
    rel_error: float
    seconds: float
    device: str
    threads: int
    kernels: dict[str, str] | None


class Report(TypedDict):
    """report.json: sizes before and after, quality and speed before and after, per-layer rows."""

    job: str
    source: str
    source_version: str | None  # the version a models:/ alias named when the source was loaded
    task: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    file_bytes_after: int
    selected_params_before: int
    selected_params_after: int
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any]
    timings: dict[str, float]
    layers: list[LayerRow]
    versions: dict[str, str]
    compression_ratio: float
    target: NotRequired[dict[str, Any]]  # recipe.target: asked and achieved
    heal: NotRequired[dict[str, Any]]  # recipe.heal: steps, losses
    execution: NotRequired[dict[str, Any]]  # where the layer tasks ran


@dataclass
class CompressionResult:
    report: Report
    model: LoadedModel  # the compressed model, as saved
