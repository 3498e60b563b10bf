"""The recipe reference in docs/, rendered from the spec models' own field descriptions so it cannot drift
from what the pipeline accepts (scripts/gen_docs.py writes it; a test compares)."""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from krunch.spec import Calibration, CompressionJob, Evaluation, Heal, JobSpec, ModelSource, QuantizeConfig, RankRule, \
    Recipe, Registry, Resources, Rule, Target  # fmt: skip

REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "recipe_reference.md"
MODELS: tuple[type[BaseModel], ...] = (CompressionJob, JobSpec, ModelSource, Recipe, Rule, RankRule, QuantizeConfig, Target,
                                       Calibration, Heal, Evaluation, Resources, Registry)  # fmt: skip


def type_name(annotation: object) -> str:
    """A field's type as a reader wants it: model names, enum values, literal choices."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(f"`{member.value}`" for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def render() -> str:
    lines = ["# Recipe reference", "",
             "Generated from `krunch.spec` by `scripts/gen_docs.py`; do not edit by hand (a test fails on drift).",
             "Keys are the YAML's camelCase names; the same fields are the CRD's `spec` and `krunch.compress`'s recipe.", ""]  # fmt: skip
    for model in MODELS:
        lines += [f"## {model.__name__}", ""]
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        if doc and not doc.startswith("!!!") and model.__doc__ is not BaseModel.__doc__:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            value = None if field.is_required() else field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else "unset" if value is None else \
                "its defaults" if isinstance(value, BaseModel) else f"`{value.value}`" if isinstance(value, enum.Enum) else f"`{value!r}`"
            cells = [f"`{key}`", type_name(field.annotation), default, " ".join((field.description or "").split())]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)
