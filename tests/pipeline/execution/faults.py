"""Fault injection, in the tests only: make one layer's first attempt fail the way real workers fail.

Handed to `RayExecutor(before_layer=...)` to prove that a killed worker is retried and that an
out-of-memory failure is retried with a larger memory request. Ray pickles this module by value, so
workers need no access to the tests.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class FaultInjection:
    layer: str
    kind: Literal["kill", "oom", "none"]  # none: only count the attempts
    marker: str  # a file the first attempt creates, so that later attempts run normally

    @property
    def attempts_file(self) -> Path:
        return Path(f"{self.marker}.attempts")

    def attempts(self) -> int:
        return len(self.attempts_file.read_text().splitlines()) if self.attempts_file.exists() else 0

    def __call__(self, layer_name: str) -> None:
        if layer_name != self.layer:
            return
        with self.attempts_file.open("a") as log:
            log.write(f"{os.getpid()}\n")
        if self.kind == "none" or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task, as under the OOM killer
        raise MemoryError(f"injected: out of memory compressing {layer_name}")
