"""Healing: a short distillation of the compressed model towards the original one.

Independent per-layer truncation loses accuracy that a few hundred optimizer
steps win back (SVD-LLM, CompactifAI): the original model is the teacher, its
outputs on the calibration stream are the targets, and only what compression
changed may move: the float factors of krunch's replacement layers, plus the
normalisation layers that rescale them. Every other parameter is frozen, so a
healed model still shares all its untouched weights with the source.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from krunch.calibration.grams import Batch
from krunch.runtime.base import CompressedLayer
from krunch.model import ModelKind
from krunch.spec import Heal, SpecError

StepCallback = Callable[[int, int, float], None]  # (step done, total steps, loss)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
MAX_GRAD_NORM = 1.0
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class Replica:
    """One of `world` data-parallel copies of the student (Ray Train): it reads every world-th batch, and
    `wrap` (DistributedDataParallel) averages the gradients so every copy takes the same step."""

    rank: int
    world: int
    wrap: Callable[[nn.Module], nn.Module]


SINGLE = Replica(0, 1, lambda module: module)


@dataclass
class HealResult:
    losses: list[float]  # one per step, measured before that step's update (the mean over replicas)
    seconds: float
    device: str
    trainable: int  # numbers that trained
    state: dict[str, torch.Tensor] = field(repr=False)  # parameter name -> healed value (CPU)
    workers: int = 1  # data-parallel replicas
    divergence: float = 0.0  # largest difference between the replicas' trained values (DDP keeps it 0)
    batches: int = 0  # distinct batches the steps cycle over (0: unknown)

    @property
    def pass_steps(self) -> int:
        """Steps that read every batch once: the window over which losses compare like with like."""
        return math.ceil(self.batches / self.workers) if self.batches else 0

    def loss_window(self) -> int:
        """Steps averaged at each end. A whole pass when the steps hold two of them: batches differ in
        difficulty (MiniLM at half its feed-forward parameters, before healing: 0.15-0.24 on the first 19 of
        its 33 Wikipedia batches, 0.34-0.45 on the other 14), so the first and last tenth of the steps, read
        from different batches, may show a loss that rose while every batch's fell. A tenth otherwise."""
        passes = self.pass_steps
        return passes if passes and len(self.losses) >= 2 * passes else max(1, len(self.losses) // 10)

    def summary(self, spec: Heal) -> dict:
        window = self.loss_window()
        head, tail = self.losses[:window], self.losses[-window:]
        passes = round(len(self.losses) / self.pass_steps, 2) if self.pass_steps else None
        return {"steps": len(self.losses), "lr": spec.lr, "tokens": spec.tokens, "items": spec.items, "device": self.device,
                "workers": self.workers, "replica_divergence": self.divergence, "trainable_params": self.trainable,
                "seconds": round(self.seconds, 2), "batches": self.batches, "batches_per_pass": self.pass_steps,
                "passes": passes, "loss_window": window,
                "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail), "losses": self.losses}  # fmt: skip


def is_norm(module: nn.Module) -> bool:
    """torch's norms plus the RMSNorm classes transformers defines per architecture (LlamaRMSNorm...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("RMSNorm")


def trainable_names(model: nn.Module) -> list[str]:
    """Float factors of the replacement layers (quantized ones stay as stored) and the norms' parameters."""
    names = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, CompressedLayer):
            names += [dot + name for name in module.factor_names if isinstance(getattr(module, name), nn.Parameter)]
        elif is_norm(module):
            names += [dot + name for name, _ in module.named_parameters(recurse=False)]
    return names


def model_output(kind: ModelKind, output: object) -> torch.Tensor:
    if kind is ModelKind.CAUSAL_LM:
        return output.logits
    if kind is ModelKind.SENTENCE_EMBEDDING:
        return output.last_hidden_state
    return output  # classifiers and the text recognizer return their logits


def distillation_loss(kind: ModelKind, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position for logits; for embeddings, the MSE relative to the teacher's energy."""
    if kind is ModelKind.SENTENCE_EMBEDDING:
        return F.mse_loss(student.float(), teacher.float()) / teacher.float().pow(2).mean().clamp(min=1e-12)
    classes = student.shape[-1]
    log_student = F.log_softmax(student.float().reshape(-1, classes), dim=-1)
    log_teacher = F.log_softmax(teacher.float().reshape(-1, classes), dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def _to(batch: Batch, device: str) -> Batch:
    args, kwargs = batch
    move = lambda value: value.to(device) if isinstance(value, torch.Tensor) else value  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first few steps, then cosine decay to a tenth of the learning rate."""
    warmup = max(1, math.ceil(steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def check_healable(student: nn.Module, kind: ModelKind | None) -> list[str]:
    """The names that will train; refused, naming the field, when healing cannot work on this model."""
    if kind is None:
        raise SpecError("spec.recipe.heal", "healing needs a model kind krunch knows (zoo:, hf: or a packaged model)")
    names = trainable_names(student)
    if not names:
        raise SpecError("spec.recipe.heal", "nothing can train: no float factors (every compressed layer is quantized) and no norms")
    return names


def healing(student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch], spec: Heal,
            device: str = "cpu", replica: Replica = SINGLE) -> Generator[tuple[int, int, float], None, HealResult]:  # fmt: skip
    """Distil `teacher` into `student` for spec.steps steps, cycling over `batches`, yielding (step, steps, loss)
    after each; returns the trained values. A generator so that a Ray task can stream its progress.

    `student` is trained in place (on `device`); the returned state is what a caller holding another copy
    of the student (the driver, when this ran in a Ray task) loads into it. As one of several replicas,
    each step reads `world` batches at once, one per replica.
    """
    names = check_healable(student, kind)
    start = time.perf_counter()
    student.to(device).eval()  # eval: dropout off and batch-norm statistics frozen; gradients still flow
    teacher.to(device).eval()
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    params = [student.get_parameter(name) for name in names]
    for p in params:
        p.requires_grad_(True)
    recurrent = any(isinstance(m, nn.RNNBase) for m in student.modules())
    trained = replica.wrap(student)  # after the requires_grad flags: DDP registers exactly the trainable tensors
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec.steps))
    losses: list[float] = []
    try:
        for step in range(spec.steps):
            args, kwargs = _to(batches[(step * replica.world + replica.rank) % len(batches)], device)
            with torch.no_grad():
                target = model_output(kind, teacher(*args, **kwargs))
            with torch.backends.cudnn.flags(enabled=not recurrent):  # cuDNN's RNN backward refuses eval mode
                loss = distillation_loss(kind, model_output(kind, trained(*args, **kwargs)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(_mean_over_replicas(loss.detach(), replica.world))
            yield step + 1, spec.steps, losses[-1]
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    state = {name: student.get_parameter(name).detach().to("cpu", copy=True) for name in names}
    return HealResult(losses, time.perf_counter() - start, device, sum(p.numel() for p in params), state, replica.world,
                      batches=len(batches))


def _mean_over_replicas(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return loss.item()


def heal(student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch], spec: Heal,
         device: str = "cpu", on_step: StepCallback | None = None) -> HealResult:  # fmt: skip
    """`healing` run to the end in this process, calling `on_step` after every step."""
    steps = healing(student, teacher, kind, batches, spec, device)
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            return finished.value
        if on_step:
            on_step(*step)


def load_healed(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy healed values into another copy of the student (same structure, e.g. the driver's)."""
    with torch.no_grad():
        for name, value in state.items():
            model.get_parameter(name).copy_(value)
