"""Keep the C allocator from returning chunk temporaries to the kernel between chunks (glibc, CPU).

The chunked solver allocates temporaries of a few MB per chunk. glibc serves such blocks by ``mmap`` or
from the top of the heap, and gives the memory back to the kernel as soon as the free top of the heap
exceeds its trim threshold (which it adapts as the process runs). Each block reallocated after that
is zeroed page by page by the kernel: on the 2-core CI machine this cost more than the arithmetic of
every dense generator, and whether it happened depended on the allocation history of the process,
which is why the same benchmark was fast in one process and 2-3x slower in the next (issue 22).

:func:`tune_cpu_allocator` fixes both thresholds once per process: blocks up to 32 MiB come from the
heap, and up to ``TRIM_THRESHOLD`` bytes of freed heap are kept for reuse instead of being returned.
It runs on the first CPU solve; ``HF_FDIV_TUNE_MALLOC=0`` turns it off (then results depend on the
allocator's state again). It does nothing outside glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_cpu_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "ENV_VAR"]

ENV_VAR = "HF_FDIV_TUNE_MALLOC"
#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 << 20
#: freed heap memory kept for reuse: several chunks' temporaries
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

_state: dict = {}


def tune_cpu_allocator() -> bool:
    """Set glibc's mmap and trim thresholds once (see the module docstring). Returns True when they are
    set (now or earlier), False when disabled by ``HF_FDIV_TUNE_MALLOC=0`` or not on glibc."""
    if "tuned" in _state:
        return _state["tuned"]
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no"):
        return False  # not cached: the variable may change
    tuned = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):
            tuned = False
    _state["tuned"] = tuned
    return tuned
