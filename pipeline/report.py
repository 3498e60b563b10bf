"""The human view of a compression report: a before/after table and the layers that lost most."""

from __future__ import annotations

from typing import Any

QUALITY_KEYS = ("perplexity", "lee50_pearson", "wordsim353_spearman", "fidelity_mean_cosine", "word_accuracy",
                "character_error_rate", "top1_agreement", "mean_kl")  # fmt: skip
SPEED_KEYS = ("tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s", "cpu_s_per_token", "memory_bytes",
              "compiled_decode_tokens_per_s", "compiled_cpu_s_per_token", "compiled_tokens_as_eager",
              "documents_per_s", "words_per_s", "images_per_s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _rank(rank: Any) -> str:
    return "" if rank is None else f" rank {rank}"


def _loss_means(heal: dict[str, Any]) -> str:
    """What the summary's first and last losses average (older reports lack the window: say nothing)."""
    window = heal.get("loss_window", 1)
    if window <= 1:
        return ""
    if window == heal.get("batches_per_pass"):
        return f", means of the first and last pass over its {heal['batches']} batches"
    return f", means of the first and last {window} steps"


def format_summary(report: dict[str, Any], worst: int = 5) -> str:
    rows: list[tuple[str, Any, Any]] = [
        ("parameters", report["params_before"], report["params_after"]),
        ("weight bytes", report["bytes_before"], report["bytes_after"]),
        ("selected layers' params", report["selected_params_before"], report["selected_params_after"]),
    ]
    before, after = report["metrics_before"], report["metrics_after"]
    rows += [(key, before.get(key, "-"), after[key]) for key in (*QUALITY_KEYS, *SPEED_KEYS) if key in after]
    width = max(len(name) for name, _, _ in rows)
    dtype = report.get("source_dtype", "float32")
    vs_fp16 = f", {report['compression_ratio_vs_fp16']:.3g}x against fp16" if "compression_ratio_vs_fp16" in report else ""
    lines = [f"{report['job']}: {report['source']} ({report['task']}, {dtype}), compression ratio {report['compression_ratio']:.3g}x{vs_fp16}"]
    lines.append(f"{'':{width}}  {'before':>14}  {'after':>14}")
    lines += [f"{name:{width}}  {_fmt(b):>14}  {_fmt(a):>14}" for name, b, a in rows]
    if "target" in report:
        t = report["target"]
        if "bytes_ratio" in t:
            mix = ", ".join(f"{count} {kind}" for kind, count in sorted(t["choices"].items()))
            lines.append(f"target bytesRatio {t['bytes_ratio']} -> achieved {t['achieved_ratio']} over {t['layers']} layers ({mix})")
        else:
            lines.append(f"target paramRatio {t['param_ratio']} -> achieved {t['achieved_ratio']} over {t['layers']} layers")
    if report.get("execution", {}).get("calibration") == "propagated":
        lines.append(f"calibration: error-propagating, block by block over {report['execution']['blocks']} blocks")
    if "heal" in report:
        h = report["heal"]
        replicas = f" x {h['workers']} replicas (DDP)" if h.get("workers", 1) > 1 else ""
        means = _loss_means(h)
        lines.append(f"heal: {h['steps']} steps on {h['device']}{replicas}, distillation loss {h['loss_first']:.4g} -> {h['loss_last']:.4g} "
                     f"({h['trainable_params']:,} trainable numbers{means})")  # fmt: skip
    timings = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report["timings"].items())
    lines.append(f"time: {timings}")
    layers = sorted(report["layers"], key=lambda row: row["rel_error"], reverse=True)[:worst]
    if layers:
        lines.append(f"largest relative weight errors ({len(report['layers'])} layers):")
        lines += [f"  {r['name']}: {r['method']}{_rank(r['rank'])}, {r['params_before']:,} -> {r['params_after']:,} params, "
                  f"error {r['rel_error']:.4f}" for r in layers]  # fmt: skip
    return "\n".join(lines)


def runtime_note(layer: Any) -> str:
    """What a layer of this plan will run on at inference (CPU), said before any work: the quantized
    kernel or why none fits, and for factorised layers the rank below which they do fewer multiply-adds."""
    return layer.implementation.runtime_note(layer) or ""


def format_plan(job_name: str, source: str, plan: Any) -> str:
    """What a job would do, grouped by the rule that selected each layer (`krunch compress --dry-run`)."""
    groups: dict[int, list[Any]] = {}
    for layer in plan.layers:
        groups.setdefault(layer.rule_index, []).append(layer)
    def params(layers: list[Any]) -> int:
        return sum(layer.params for layer in layers if not layer.tied_to)  # a tied weight is stored once

    def count(layers: list[Any]) -> str:
        return f"{len(layers)} layer" + ("s" if len(layers) != 1 else "")

    lines = [f"{job_name}: {source}, {count(plan.layers)} selected, {params(plan.layers):,} parameters"]
    for index, layers in sorted(groups.items()):
        first = layers[0]
        if first.rank is not None:
            rank = first.rank.model_dump(by_alias=True, exclude_none=True)
        else:
            rank = "from target" if first.factorized else "-"
            rank += f" (floor {first.floor:g} of its parameters)" if first.floor is not None else ""
        quantize = f"int{first.quantize.bits}" if first.quantize else "no quantization"
        quantize += ", gptq rounding" if first.gptq else ""
        quantize += ", fitted grid" if first.quantize and first.quantize.grid.value == "fitted" else ""
        quantize += " (to calibration inputs)" if first.grid_fitted_to_inputs else ""
        aware = ", activation-aware" if first.activation_aware else ""
        aware += first.implementation.describe(first)
        tied = sum(1 for layer in layers if layer.tied_to)
        lines.append(f"  rules[{index}] {first.method}{aware}, rank {rank}, {quantize}: {count(layers)}, "
                     f"{params(layers):,} params" + (f" ({tied} tied, stored once)" if tied else "")
                     + f"; e.g. {first.name} {'x'.join(map(str, first.weight_shape))}")  # fmt: skip
        notes: dict[str, int] = {}
        for layer in layers:
            if note := runtime_note(layer):
                notes[note] = notes.get(note, 0) + 1
        lines += [f"    runtime, {n} layer{'s' if n != 1 else ''}: {note}" for note, n in notes.items()]
    lines += [f"  skipped, {len(names)} module{'s' if len(names) != 1 else ''} (e.g. {names[0]}): {why}"
              for why, names in plan.skipped_reasons().items()]  # fmt: skip
    return "\n".join(lines)


def format_stages(recipe: Any) -> str:
    """The optional stages around the per-layer work, for the dry run."""
    lines = []
    if recipe.calibration is not None and recipe.calibration.propagate:
        lines.append("  calibration: error-propagating (block by block, each layer refitted to the original outputs)")
    if recipe.heal is not None:
        h = recipe.heal
        lines.append(f"  heal: {h.steps} distillation steps, lr {h.lr:g}, {h.tokens:,} tokens / {h.items} items of calibration data")
    return "\n".join(lines)
