"""Freed memory handed back to the system, so that a streamed driver's resident memory follows what it holds.

glibc's malloc serves large blocks with their own mappings, but after such a block is freed it raises that
threshold to the block's size (up to 32 MB) and serves later ones from its heap, which it keeps: a driver that
reads and drops one 14 MB block after another then grows by every block it ever held. A fixed threshold keeps
each tensor of 1 MB or more in a mapping of its own, returned when the tensor is freed.
"""

from __future__ import annotations

from krunch.runtime.memory import c_library

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 2**20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc."""
    mallopt = getattr(c_library(), "mallopt", None)  # musl and others have none
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
