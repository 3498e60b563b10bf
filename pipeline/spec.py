"""The CompressionJob spec: one pydantic model for the CLI, the operator and the Ray job.

The YAML a user writes is a Kubernetes custom resource; `krunch compress`
reads the same file. Field names are camelCase (aliases) and unknown fields
are errors, so a typo never silently falls back to a default. Errors name the
field path as a user sees it, e.g. `spec.recipe.rules[2].rank`.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from krunch import methods
from krunch.errors import KrunchError

API_VERSION = "krunch.dev/v1alpha1"
KIND = "CompressionJob"
# Bounds on what a small file can ask for: beyond these a job is a mistake or an attack, not a workload.
MAX_JOB_BYTES = 1 << 20
MAX_RULES = 1000
MAX_WORKERS = 4096
MAX_TOKENS = 1 << 27  # 134M tokens: a few days of CPU calibration
MAX_ITEMS = 1 << 20
MODEL_KINDS = ("causal-lm", "sentence-embedding", "text-recognizer", "image-classifier")  # krunch.model.ModelKind (no torch here)
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SpecError(KrunchError):
    """An invalid job spec; `subject` is the field path."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class LowRankForm(str, enum.Enum):
    PIVOTED = "pivoted"  # r pivot rows + coefficients for the rest: r (m + n - r) numbers (PIFA)
    FACTORS = "factors"  # two thin matrices: r (m + n) numbers, two plain Linears


class RankRule(_Model):
    """How many components to keep; exactly one of fixed, energy, maxError."""

    fixed: int | None = Field(None, ge=1, le=1_000_000, description="keep exactly this rank (bond dimension for tt)")
    energy: float | None = Field(None, gt=0, le=1, description="keep this fraction of the squared singular values")
    max_error: float | None = Field(None, gt=0, lt=1, description="bound on the relative Frobenius error")

    @model_validator(mode="after")
    def _exactly_one(self) -> RankRule:
        chosen = [name for name, value in (("fixed", self.fixed), ("energy", self.energy), ("maxError", self.max_error)) if value is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of fixed, energy, maxError (got {', '.join(chosen) or 'none'})")
        return self


class Rounding(str, enum.Enum):
    NEAREST = "nearest"  # round to nearest (RTN)
    GPTQ = "gptq"  # Frantar et al. 2023: rounding errors compensated through the inputs' Gram matrix


class Grid(str, enum.Enum):
    RANGE = "range"  # each group's scale (and zero point) from its min and max
    FITTED = "fitted"  # scale and zero point fitted to minimise the group's rounding error (runtime.quant.fitted_scales)


class QuantizeConfig(_Model):
    bits: Literal[2, 3, 4, 8] = Field(8, description="integer width: 8, 4 (two values packed per byte), 3 (eight per three bytes) "
                                      "or 2 (four per byte); int3 and int2 have no packed kernel and dequantize each forward")
    group_size: int | None = Field(None, ge=8, le=1_000_000, description="values per scale along the input dimension; omit for one scale per output channel")
    symmetric: bool = Field(True, description="symmetric (no zero point) or asymmetric (scale and zero point)")
    rounding: Rounding = Field(
        Rounding.NEAREST, description="nearest: each value to its nearest level, no data needed. gptq: column by column, "
        "each column's rounding error compensated in the columns not yet rounded, for the calibration activations "
        "(recipe.calibration); dense Linear weights only (in recipe.quantize it leaves factors and convolutions at nearest)",
    )
    grid: Grid = Field(
        Grid.RANGE, description="range: each group's levels span its min and max. fitted: the scale (and zero point) that "
        "minimise the group's rounding error, clipping outliers where that pays; for dense Linear weights weighted by how "
        "large each input is on the calibration data when recipe.calibration is set (never a higher output error there "
        "than range), data-free otherwise; with gptq the fitted grid is fixed first and columns go in activation order",
    )

    def nearest(self) -> QuantizeConfig:
        """The same layout rounded to nearest: for weights gptq cannot reach (factors, convolutions, embeddings)."""
        return self.model_copy(update={"rounding": Rounding.NEAREST})

    @field_validator("group_size")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("must be even (int4 values are packed in pairs)")
        return value


class Rule(_Model):
    match: str = Field(min_length=1, description="glob on module names, e.g. '*.mlp.*'; the first matching rule wins")
    method: str = Field(
        description="how the layer is stored: none (dense, quantized when quantize is set), svd, tt, tucker, cp, "
        "or a method a plugin registered (krunch.methods)",
        json_schema_extra=lambda schema: schema.update(enum=methods.names()),
    )
    options: dict[str, Any] | None = Field(
        None, description="options of the rule's method, checked by the method's own schema (plugins; the built-in methods take none)"
    )
    rank: RankRule | None = Field(None, description="required for factorizing methods unless recipe.target is set")
    activation_aware: bool = Field(False, description="svd/tt/tucker: fit the factors to the layer's outputs on calibration data, not to its weights (svd/tt: whitened truncation; tucker: whitened input channels, least-squares core, principal output channels)")
    quantize: QuantizeConfig | bool | None = Field(None, description="override recipe.quantize for this rule: a config, or false")
    form: LowRankForm | None = Field(
        None, description="svd: how the low-rank weight is stored (default: pivoted, except int4 factors keep two). pivoted: its r pivot rows "
        "plus the other rows as combinations of them, the same weight in r^2 fewer numbers, so a higher rank fits a budget; "
        "factors: two thin matrices",
    )
    floor: float | None = Field(
        None, gt=0, lt=1, description="with recipe.target: keep at least this fraction of each layer's weight parameters "
        "(guidance such as CompactifAI's: spare the early layers, a block's last MLP)",
    )
    max_error: float | None = Field(
        None, gt=0, le=1, description="with recipe.target: the largest relative truncation error (from the weight's spectrum) "
        "the allocator may give any layer of this rule (default 0.9: no layer is cut to almost nothing to spare the others); "
        "1 turns the ceiling off",
    )

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_flag(cls, value: Any) -> Any:
        if value is True:
            raise ValueError("use a quantize config ({bits: 8}) or false; true is ambiguous")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        methods.get(value)  # ValueError naming the known ones
        return value

    @model_validator(mode="after")
    def _fits_method(self) -> Rule:
        method = self.implementation
        if not method.factorizing and self.rank is not None:
            raise ValueError(f"method {method.name} keeps the layer dense; remove rank")
        if self.activation_aware and not method.activation_aware:
            aware = ", ".join(name for name in methods.names() if methods.get(name).activation_aware)
            raise ValueError(f"activationAware is available for methods {aware}, not {method.name}")
        if self.form is not None and "form" not in method.rule_fields:
            raise ValueError(f"form chooses how an svd layer is stored; method {method.name} has no form")
        if method.factorizing and not method.spectral and self.rank is not None and self.rank.fixed is None:
            raise ValueError(f"{method.name} has no spectrum to read a rank from: use rank.fixed")
        self.method_options()  # validated now, before any work
        return self

    @property
    def implementation(self) -> methods.CompressionMethod:
        return methods.get(self.method)

    def method_options(self) -> Any:
        """rule.options validated by the method's own model (None when the method takes none)."""
        schema = self.implementation.options
        if schema is None:
            if self.options:
                raise ValueError(f"options: method {self.method} takes no options (got {', '.join(sorted(self.options))})")
            return None
        try:
            return schema.model_validate(self.options or {})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"options.{where}: {first['msg']}") from None

    def quantize_config(self, default: QuantizeConfig | None) -> QuantizeConfig | None:
        if self.quantize is False:
            return None
        return self.quantize if isinstance(self.quantize, QuantizeConfig) else default


BUDGET_BITS = [8, 4]  # the widths a packed kernel runs; 3 and 2 bits only when target.bits asks for them


class Target(_Model):
    """A global size budget over the layers whose rules give no rank; exactly one of the two."""

    param_ratio: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the selected layers' parameters")
    bytes_ratio: float | None = Field(
        None, gt=0, lt=1, description="keep this fraction of their weight bytes (as the source stores them): each layer dense or "
        "factorised, as floats or quantized at one of `bits`",
    )
    bits: list[Literal[2, 3, 4, 8]] = Field(
        BUDGET_BITS, min_length=1, max_length=4, description="quantized widths the bytesRatio budget may choose per layer (each in "
        "several group sizes); 3 and 2 bits have no packed kernel and run dequantized",
    )

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.param_ratio is None) == (self.bytes_ratio is None):
            raise ValueError("give exactly one of paramRatio and bytesRatio")
        if self.bits != BUDGET_BITS and self.bytes_ratio is None:  # (a saved recipe document writes the default)
            raise ValueError("bits: the widths a bytesRatio budget chooses among; paramRatio keeps floats")
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits: each width once, got {self.bits}")
        return self

    @property
    def field(self) -> str:
        return "spec.recipe.target." + ("paramRatio" if self.param_ratio is not None else "bytesRatio")


class Calibration(_Model):
    data: str = Field("wikipedia", description="built-in data set name or file:PATH; the calibration half is used")
    tokens: int = Field(8192, ge=64, le=MAX_TOKENS, description="calibration tokens (text models)")
    items: int = Field(128, ge=1, le=MAX_ITEMS, description="calibration images or words (vision models)")
    propagate: bool = Field(
        False, description="error-propagating: compress block by block, each activation-aware or gptq-rounded layer fitted "
        "to the original outputs from the inputs of the model compressed so far",
    )


class Heal(_Model):
    """A short distillation after compression: the original model teaches the compressed one, and only the
    compressed layers' float factors and the normalisation layers train (recipe.heal)."""

    steps: int = Field(100, ge=1, le=100_000, description="optimizer steps, one calibration batch each")
    lr: float = Field(2e-5, gt=0, le=1, description="AdamW learning rate (cosine decay after a short warm-up)")
    tokens: int = Field(16384, ge=64, le=MAX_TOKENS, description="distillation tokens from the calibration half (text models), cycled over the steps")
    items: int = Field(256, ge=1, le=MAX_ITEMS, description="distillation images or words (vision models)")


class Recipe(_Model):
    target: Target | None = None
    rules: list[Rule] = Field(min_length=1, max_length=MAX_RULES)
    quantize: QuantizeConfig | None = None
    calibration: Calibration | None = None
    heal: Heal | None = Field(None, description="distil the compressed model towards the original before evaluating it")

    @model_validator(mode="after")
    def _ranks_known(self) -> Recipe:
        if self.target is None:
            for index, rule in enumerate(self.rules):
                if rule.implementation.factorizing and rule.rank is None:
                    raise ValueError(f"rules[{index}].rank: required for method {rule.method} unless a target is set")
        for index, rule in enumerate(self.rules):
            if rule.implementation.needs_quantize and rule.quantize_config(self.quantize) is None:
                raise ValueError(f"rules[{index}].quantize: method {rule.method} stores a quantized weight; set recipe.quantize "
                                 "or the rule's own quantize")  # fmt: skip
            for name, value in (("floor", rule.floor), ("maxError", rule.max_error)):
                if value is not None and (self.target is None or rule.rank is not None or not rule.implementation.factorizing):
                    raise ValueError(f"rules[{index}].{name}: only for factorising rules without a rank, whose ranks come from recipe.target")
        if self.target is not None:
            for index, rule in enumerate(self.rules):
                if rule.implementation.factorizing and not rule.implementation.spectral and rule.rank is None:
                    raise ValueError(f"rules[{index}].rank: {rule.method} needs rank.fixed (it has no spectrum to share a budget by)")
        if self.target is not None and self.target.bytes_ratio is not None:
            for index, rule in enumerate(self.rules):
                if rule.implementation.factorizing and rule.rank is None and rule.quantize is not None:
                    raise ValueError(f"rules[{index}].quantize: under target.bytesRatio the budget chooses each layer's "
                                     "storage; set symmetric and rounding in recipe.quantize")  # fmt: skip
        if self.calibration is not None and self.calibration.propagate and not self.uses_calibration:
            raise ValueError("calibration.propagate: needs a rule with activationAware: true, gptq rounding or a fitted grid "
                             "(it refits those layers)")  # fmt: skip
        if self.target is not None and not any(rule.implementation.factorizing and rule.rank is None for rule in self.rules):
            raise ValueError("target needs at least one factorizing rule without its own rank to allocate")
        return self

    @property
    def needs_calibration(self) -> bool:
        """Some layer is fitted to calibration activations: activation-aware factors or gptq rounding."""
        return any(rule.activation_aware or _gptq(rule.quantize_config(self.quantize)) for rule in self.rules)

    @property
    def uses_calibration(self) -> bool:
        """Calibration data will be read: some layer needs it, or a fitted grid is weighted by it (with a
        calibration section; data-free without one)."""
        fitted = any(_fitted(rule.quantize_config(self.quantize)) for rule in self.rules)
        return self.needs_calibration or self.calibration is not None and fitted


def _gptq(config: QuantizeConfig | None) -> bool:
    return config is not None and config.rounding is Rounding.GPTQ


def _fitted(config: QuantizeConfig | None) -> bool:
    return config is not None and config.grid is Grid.FITTED


class Preprocessing(_Model):
    """How a picture becomes the image model's input (the defaults: torchvision's ImageNet eval transform)."""

    resize: int = Field(256, ge=8, le=4096, description="the picture's short side is resized to this many pixels")
    crop: int = Field(224, ge=8, le=4096, description="then a centred square of this many pixels is cut")
    mean: list[float] = Field([0.485, 0.456, 0.406], min_length=1, max_length=3, description="per channel, on pixels scaled to [0, 1]")
    std: list[float] = Field([0.229, 0.224, 0.225], min_length=1, max_length=3, description="per channel, each above 0")
    grayscale: bool = Field(False, description="one channel instead of RGB")

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        if self.crop > self.resize:
            raise ValueError(f"crop: {self.crop} is larger than resize {self.resize}")
        channels = 1 if self.grayscale else 3
        for name in ("mean", "std"):
            if len(getattr(self, name)) != channels:
                raise ValueError(f"{name}: {channels} value(s) for {'grayscale' if self.grayscale else 'RGB'} input, got {len(getattr(self, name))}")
        if any(not 0 < value < 1e6 for value in self.std):
            raise ValueError("std: every value must be above 0")
        if any(abs(value) > 1e6 for value in self.mean):
            raise ValueError("mean: values are for pixels scaled to [0, 1]")
        return self


class ModelSource(_Model):
    source: str = Field(min_length=1, description="zoo:NAME | hf:DIR | file:PATH (+ factory) | models:/NAME/VERSION | models:/NAME@ALIAS")
    factory: str | None = Field(None, description="module:callable that builds the architecture for a file: source")
    kind: str | None = Field(None, description="what a factory's bare module is, which decides how it is calibrated and evaluated: "
                             "image-classifier (the kinds with a tokenizer or charset come from their sources: hf:, zoo:)")
    preprocessing: Preprocessing | None = Field(None, description="image-classifier: how pictures become its inputs "
                                                "(default: the ImageNet eval transform)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        if value is not None and value not in MODEL_KINDS:
            raise ValueError(f"unknown kind {value!r}; choose one of {', '.join(MODEL_KINDS)}")
        return value


class Task(enum.Enum):
    """Evaluation tasks (their evaluators live in krunch.evaluation). Here so that validating a spec, as the
    operator does, needs no torch."""

    PERPLEXITY = "perplexity"
    EMBEDDING = "embedding"
    OCR = "ocr"
    IMAGE_AGREEMENT = "image-agreement"

    @property
    def primary_metric(self) -> tuple[str, bool]:
        """The one number that says how good a model is at this task: (metrics key, True if higher is better)."""
        return {"perplexity": ("perplexity", False), "embedding": ("lee50_pearson", True), "ocr": ("word_accuracy", True),
                "image-agreement": ("top1_agreement", True)}[self.value]  # fmt: skip


class Evaluation(_Model):
    task: str | None = Field(None, description="perplexity | embedding | ocr | image-agreement; default: the model's own")
    reference: ModelSource | None = Field(None, description="image-agreement, embedding: the model the compressed one is "
                                          "compared with (default: the source model itself)")
    data: str | None = Field(None, description="text for perplexity: wikipedia, news (300 news articles, another domain) or file:PATH")
    tokens: int = Field(4096, ge=64, le=MAX_TOKENS)
    items: int | None = Field(None, ge=1, le=MAX_ITEMS, description="cap on words or images")
    compiled_decode: bool = Field(False, description="perplexity: also decode through krunch.runtime.greedy_decode, one compiled "
                                  "step per token, before and after (compiling takes tens of seconds per model on a small CPU)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        if value is not None and value not in {t.value for t in Task}:
            raise ValueError(f"unknown task {value!r}; choose one of {', '.join(t.value for t in Task)}")
        return value

    @model_validator(mode="after")
    def _compiled_decode_needs_text(self) -> Evaluation:
        if self.compiled_decode and self.task not in (None, Task.PERPLEXITY.value):
            raise ValueError(f"compiledDecode measures a causal LM's decode (task perplexity), not task {self.task}")
        return self


class Resources(_Model):
    workers: int | None = Field(
        None, ge=1, le=MAX_WORKERS, description="layer tasks running at once; default: as many as the Ray cluster's CPUs (and GPUs) hold"
    )
    cpus_per_task: float = Field(
        1, gt=0, le=1024, allow_inf_nan=False, description="CPUs per layer task; torch uses that many threads (the factors' last bits depend on it)"
    )
    gpus_per_task: float = Field(0, ge=0, le=64, allow_inf_nan=False, description="GPU fraction per layer task; 0 runs on CPU")
    heal_workers: int = Field(
        1, ge=1, le=256, description="recipe.heal replicas, data-parallel through Ray Train (DDP): a GPU each when the "
        "cluster has GPUs, else an equal share of its CPUs; each step then reads this many batches",
    )
    stream: bool = Field(
        False, description="the driver holds about one block of weights at a time, for models bigger than its memory: the "
        "source stays in its safetensors files (hf: and zoo: transformers models) and is read unit by unit when evaluated, "
        "layers are compressed a block at a time and written to shards as they finish; calibrated layers (gptq, fitted grids, "
        "activationAware, propagate) one block per task, their statistics in the task. No heal or paramRatio yet; no "
        "inference-speed figures (a streamed model reads its weights on every call)",
    )


REGISTRY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class Registry(_Model):
    """Where the compressed model is registered. Names are checked here, before any work, with rules
    a little stricter than MLflow's own (no '/', ':', spaces or path tricks; aliases not 'latest' or vN)."""

    name: str = Field(min_length=1, max_length=256, pattern=REGISTRY_NAME_PATTERN,
                      description="registered model name in MLflow: letters, digits, '.', '_', '-'")  # fmt: skip
    alias: str | None = Field(None, max_length=255, pattern=ALIAS_PATTERN,
                              description="alias set on the new version, e.g. candidate (not 'latest', not v<N>)")  # fmt: skip

    @field_validator("name")
    @classmethod
    def _not_a_path(cls, value: str) -> str:
        if ".." in value:
            raise ValueError(f"{value!r} contains '..'; registered model names must not look like paths")
        return value

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value is not None and (value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value)):
            raise ValueError(f"{value!r} is reserved by MLflow ('latest' and v<N> name versions, not aliases)")
        return value


class Executor(str, enum.Enum):
    RAY_CLUSTER = "rayCluster"  # submit through the Ray Jobs API to an existing cluster
    RAY_JOB = "rayJob"  # create a KubeRay RayJob with its own ephemeral cluster


class JobSpec(_Model):
    model: ModelSource
    recipe: Recipe
    evaluation: Evaluation = Evaluation()
    resources: Resources = Resources()
    registry: Registry | None = None
    # Scheduling on a cluster: read by the operator, ignored by `krunch compress` (one file works both ways).
    priority: int = Field(0, ge=-1000, le=1000, description="operator: among queued jobs, higher starts first (then older first)")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="operator: fail the job (DeadlineExceeded) and stop its Ray job after this many seconds running"
    )
    backoff_limit: int = Field(0, ge=0, le=10, description="operator: resubmit a failed Ray job this many times before Failed")
    executor: Executor | None = Field(None, description="operator: rayCluster or rayJob; default: the operator's setting")
    ray_address: str | None = Field(
        None, min_length=1, pattern=r"^https?://", description="operator, rayCluster: Ray dashboard URL for this job, e.g. http://ray-head:8265"
    )


class Metadata(BaseModel):
    """Kubernetes metadata: only the name is required; the rest (uid, labels...) is kept as given. The name is
    a DNS-1123 subdomain, as Kubernetes requires: it names the default output directory, so it can never be a
    path (no '/', no '..', nothing absolute)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="lower-case letters, digits, '-' and '.', starting and ending alphanumeric")  # fmt: skip


class CompressionJob(_Model):
    api_version: Literal["krunch.dev/v1alpha1"]
    kind: Literal["CompressionJob"]
    metadata: Metadata
    spec: JobSpec


def field_path(location: tuple[int | str, ...]) -> str:
    """pydantic's error location as a user reads it: spec.recipe.rules[2].rank."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part[:1].isupper() or "[" in part:  # union member tags such as QuantizeConfig, bool
            continue
        else:
            path += f".{part}" if path else part
    return path or "(document)"


def parse_job(document: Any, source: str = "job") -> CompressionJob:
    """Validate a job document; raise SpecError naming the first bad field and the reason."""
    if not isinstance(document, dict):
        raise SpecError(source, f"expected a CompressionJob mapping, got {type(document).__name__}")
    try:
        return CompressionJob.model_validate(document)
    except ValidationError as err:
        raise spec_error(err) from None


def spec_error(err: ValidationError, prefix: tuple[int | str, ...] = ()) -> SpecError:
    """The first of pydantic's errors as a SpecError: the field path a user reads, and the reason."""
    first = err.errors()[0]
    location = (*prefix, *first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith(("rules[", "options.")) and ":" in message:  # a check that names the field inside
        inner, _, message = message.partition(": ")
        location = (*location, *_split_path(inner))
    if first["type"] == "literal_error" and location[-1:] in (("apiVersion",), ("kind",)):
        message = f"{message}; this file is not a {KIND} (apiVersion {API_VERSION})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return SpecError(field_path(location), f"{message}{more}")


def _split_path(text: str) -> tuple[int | str, ...]:
    parts: list[int | str] = []
    for piece in text.replace("]", "").split("."):
        name, _, index = piece.partition("[")
        parts.append(name)
        if index:
            parts.append(int(index))
    return tuple(parts)


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML anchors and aliases (&name, *name) are not accepted (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def safe_yaml_documents(text: str, source: str) -> list[Any]:
    """Parse job or recipe text within the bounds: at most MAX_JOB_BYTES, no anchors or aliases."""
    if len(text.encode("utf-8", "replace")) > MAX_JOB_BYTES:
        raise SpecError(source, f"larger than {MAX_JOB_BYTES // 1024} KiB; a job file is a few KiB")
    try:
        return [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError(source, f"not valid YAML ({' '.join(str(err).split())[:300]})") from None


def load_job(path: Path) -> CompressionJob:
    if not path.is_file():
        raise SpecError(str(path), "job file not found")
    if path.stat().st_size > MAX_JOB_BYTES:  # refused before reading it
        raise SpecError(str(path), f"larger than {MAX_JOB_BYTES // 1024} KiB; a job file is a few KiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    documents = safe_yaml_documents(text, str(path))
    if len(documents) != 1:
        raise SpecError(str(path), f"expected one CompressionJob document, found {len(documents)}")
    return parse_job(documents[0], str(path))
