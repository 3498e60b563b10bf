"""Where a job's files go: checked before any work, written into a staging sibling and swapped in whole at
the end, so a failed or interrupted run leaves no partial directory and a rerun no stale file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from krunch.errors import KrunchError

RESULTS = Path("results")
SPACE_MARGIN = 1.25  # free space wanted over the estimate: the file is written once, plus the staging copy's metadata
OUTPUT_FILES = {"model.safetensors", "model.safetensors.index.json", "manifest.json", "report.json", "budget.json", "architecture"}
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shards of a model past artifact.MAX_SHARD_BYTES


class OutputError(KrunchError):
    """An output directory krunch cannot or must not write."""


def output_dir(job_name: str, out: Path | None) -> Path:
    """`--out`, or results/<metadata.name> (a DNS-1123 name: never a path)."""
    return out if out is not None else RESULTS / job_name


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while True:
        try:
            if path.exists():
                return path
        except OSError:  # a component too long to even look up
            pass
        path = path.parent


def _is_previous_output(directory: Path, job_name: str) -> bool:
    """krunch's own files of the same job, and nothing else."""
    names = {p.name for p in directory.iterdir() if not SHARD.fullmatch(p.name)}
    if not names <= OUTPUT_FILES or "report.json" not in names:
        return False
    try:
        return json.loads((directory / "report.json").read_text(encoding="utf-8")).get("job") == job_name
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, job_name: str, estimated_bytes: int | None = None, field: str = "--out") -> None:
    """Everything about the output directory that can fail, checked before the work that would fill it."""
    text = str(out)
    if "\x00" in text:
        raise OutputError(field, "contains a NUL byte")
    existing = _nearest_existing(out)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in [*out.absolute().parts[len(existing.parts):], f".{out.name}.partial-xxxxxxxx"]:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"{field} {out}", f"the name {part[:40]}... is {len(os.fsencode(part))} bytes; "
                                                f"the file system allows {limit}")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise OutputError(f"{field} {out}", "is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_output(out, job_name):
        raise OutputError(f"{field} {out}", f"holds files that are not a previous output of job {job_name}; "
                                            "choose another directory or empty this one")  # fmt: skip
    if not existing.is_dir():
        raise OutputError(f"{field} {out}", f"{existing} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".krunch-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        cause = "read-only file system" if err.errno == errno.EROFS else (err.strerror or type(err).__name__)
        raise OutputError(f"{field} {out}", f"cannot write under {existing} ({cause})") from None
    if estimated_bytes:
        free = shutil.disk_usage(existing).free
        if free < estimated_bytes * SPACE_MARGIN:
            raise OutputError(f"{field} {out}", f"needs about {estimated_bytes * SPACE_MARGIN / 1e6:,.0f} MB; "
                                                f"{existing} has {free / 1e6:,.0f} MB free")  # fmt: skip


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh sibling of `out` to write into; on success it replaces `out` (a rename), on any failure or
    interrupt it is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(retired / out.name)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def remove_abandoned(out: Path) -> None:
    """Staging directories of `out` whose process is gone (killed with SIGKILL, or the machine lost)."""
    for sibling in out.parent.glob(f".{out.name}.partial-*"):
        pid = sibling.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def source_bytes(reference: str) -> int | None:
    """The source's weight files on disk, an upper bound on the compressed file (None: not known cheaply)."""
    scheme, _, rest = reference.partition(":")
    if scheme not in ("hf", "file", "krunch"):
        return None
    path = Path(rest).expanduser()
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    except OSError:
        return None
    return None
