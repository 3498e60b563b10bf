"""The figures people would rather look at than read: per-layer ranks and errors, and quality vs size
across the versions of one registered model. Pure: report data in, matplotlib figure out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no window, and no global registry keeping every figure alive


def _short(name: str) -> str:
    """'model.layers.12.mlp.up_proj' -> 'layers.12.mlp.up_proj': enough to tell layers apart on an axis."""
    return name.removeprefix("model.")


def layer_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Three stacked panels over the layers in model order: kept rank, parameters after / before, relative error."""
    names = [_short(row["name"]) for row in rows]
    ranks = [row["rank"][0] if isinstance(row["rank"], list) else (row["rank"] or 0) for row in rows]
    ratios = [row["params_after"] / row["params_before"] if row["params_before"] else 1.0 for row in rows]
    errors = [row["rel_error"] for row in rows]
    positions = range(len(rows))
    figure = Figure(figsize=(max(8, len(rows) * 0.09), 9))
    top, middle, bottom = figure.subplots(3, 1, sharex=True)
    top.bar(positions, ranks, color="#4c72b0")
    top.set_ylabel("rank (first bond)")
    middle.bar(positions, ratios, color="#55a868")
    middle.axhline(1.0, color="grey", linewidth=0.8)
    middle.set_ylabel("params after / before")
    bottom.bar(positions, errors, color="#c44e52")
    bottom.set_ylabel("relative weight error")
    bottom.set_xticks(list(positions))
    bottom.set_xticklabels(names, rotation=90, fontsize=5 if len(rows) > 60 else 7)
    top.set_title(title)
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class VersionPoint:
    version: str
    size_bytes: float
    quality: float
    current: bool = False


def quality_size_figure(points: list[VersionPoint], baseline: tuple[float, float] | None, metric: str, title: str) -> Figure:
    """Every version of the registered model as a point (size, quality); this one highlighted, the source
    model as a reference point, so the trade-off of this version reads against its siblings."""
    figure = Figure(figsize=(7, 5))
    axes = figure.subplots()
    others = [p for p in points if not p.current]
    if others:
        axes.scatter([p.size_bytes / 1e6 for p in others], [p.quality for p in others], color="#8c8c8c", label="earlier versions")
        for point in others:
            axes.annotate(f"v{point.version}", (point.size_bytes / 1e6, point.quality), fontsize=8, xytext=(4, 4), textcoords="offset points")
    for point in (p for p in points if p.current):
        axes.scatter([point.size_bytes / 1e6], [point.quality], color="#c44e52", s=80, label=f"this version (v{point.version})", zorder=3)
    if baseline is not None:
        axes.scatter([baseline[0] / 1e6], [baseline[1]], marker="*", s=160, color="#4c72b0", label="source model", zorder=3)
    axes.set_xlabel("weight size (MB)")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def heal_figure(losses: list[float], title: str, window: int = 0) -> Figure:
    """Distillation loss per step (log scale: it falls by orders of magnitude early), with a running mean over
    `window` steps: one pass over the batches, whose difficulties differ, shows the trend a step's loss hides."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, color="#8c8c8c", linewidth=0.8, label="per step")
    window = window or max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    axes.plot(steps, running, color="#c44e52", linewidth=2, label=f"mean of {window}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("distillation loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
