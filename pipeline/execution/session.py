"""Connect to Ray: the cluster in `RAY_ADDRESS`, or a local instance bounded to this machine.

`krunch compress` always runs its layer tasks on Ray. With no address it starts
a local instance sized for the box (all CPUs, an object store that leaves room
for the model and the evaluation), warms its workers, and shuts it down afterwards; a session that
is already connected (a test fixture, a notebook) is reused and left running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from krunch.errors import KrunchError, require_extra

GIB = 2**30
OBJECT_STORE_FRACTION = 0.15  # of physical memory; grams and results pass through, weights mostly don't
OBJECT_STORE_BOUNDS = (GIB // 2, 4 * GIB)


@dataclass(frozen=True)
class RaySession:
    address: str  # "local" for an instance this process started
    started_here: bool
    cpus: float
    gpus: float
    largest_node_memory: float  # Ray's schedulable `memory` resource on the biggest node, bytes
    largest_node_gpus: float
    nodes: int
    largest_node_cpus: float = 0.0
    # which nodes see which source files, asked once per session (error propagation runs a stage per block)
    source_seen_by: dict[tuple[Path, ...], dict[str, bool]] = field(default_factory=dict, compare=False, repr=False)


def local_object_store_bytes() -> int:
    import psutil  # Ray's own dependency: there whenever Ray is

    low, high = OBJECT_STORE_BOUNDS
    return int(min(max(psutil.virtual_memory().total * OBJECT_STORE_FRACTION, low), high))


@contextmanager
def ray_session(address: str | None = None) -> Iterator[RaySession]:
    require_extra("ray", "ray", "running layer tasks on Ray")
    import ray

    if ray.is_initialized():
        yield describe(ray, "existing", started_here=False)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise KrunchError("RAY_ADDRESS", f"cannot connect to the Ray cluster at {address!r}: {err}") from None
    else:
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=local_object_store_bytes(), include_dashboard=False, **quiet)
        warm_workers(ray, os.cpu_count() or 1)
    try:
        yield describe(ray, address or "local", started_here=True)
    finally:
        ray.shutdown()


def _import_layer_code() -> int:
    import krunch.execution.tasks  # noqa: F401 - torch, tensorly and the decompositions

    return os.getpid()


def warm_workers(ray, count: int) -> None:  # noqa: ANN001 - the ray module
    """Have each local worker import the layer code now (~3 s each, in parallel), not during the first layers."""
    warm = ray.remote(num_cpus=1)(_import_layer_code)
    ray.get([warm.remote() for _ in range(count)], timeout=120)


def describe(ray, address: str, started_here: bool) -> RaySession:  # noqa: ANN001 - the ray module
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    resources = [node.get("Resources", {}) for node in nodes]
    total = ray.cluster_resources()
    return RaySession(
        address=address,
        started_here=started_here,
        cpus=total.get("CPU", 0.0),
        gpus=total.get("GPU", 0.0),
        largest_node_memory=max((r.get("memory", 0.0) for r in resources), default=0.0),
        largest_node_gpus=max((r.get("GPU", 0.0) for r in resources), default=0.0),
        nodes=len(nodes),
        largest_node_cpus=max((r.get("CPU", 0.0) for r in resources), default=0.0),
    )
