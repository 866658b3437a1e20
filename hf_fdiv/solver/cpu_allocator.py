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

Outputs of a call ([N, V] probabilities, gradients) are larger than any threshold: each comes from a fresh
``mmap`` and costs one page fault per 4 KiB page on first write (64 000 for a 2048 x 32 000 fp32 buffer,
measured 90-100 ms on the CI machine, as much as the arithmetic of a loss). :func:`empty_like_output`
allocates them with ``madvise(MADV_HUGEPAGE)`` where Linux's transparent huge pages are in ``madvise``
mode (the common default), so that the kernel maps 2 MiB pages: 512x fewer faults (measured 637 per
call, 26 ms, when huge pages are free; the kernel falls back to small pages silently when they are not).
The same ``HF_FDIV_TUNE_MALLOC=0`` turns it off.

Even on huge pages, the first write to fresh memory is what an output costs most on the CI machine (a
virtual machine): measured on the same 1 GiB output, 70 ms in one call and 1.3 s in another, with the
same 511 huge-page faults and no compaction, because the host backs the guest's freed memory again at
random; ``torch.softmax`` at 8192 x 32 768 spends 100 ms on arithmetic and 200-1 500 ms on its fresh
output and gradient. So outputs are **cached**: :func:`empty_like_output` maps them itself (anonymous
``mmap``, huge pages advised) and keeps each mapping after the tensors on it are gone, to hand it out
again for the next output of the same size, as PyTorch's CUDA allocator keeps freed blocks. A mapping
is reused only when no tensor (or view, or array) holds it any more; the cache holds at most
``OUTPUT_CACHE_BYTES`` (idle mappings of other sizes are unmapped to make room, beyond that outputs are
plain allocations), and :func:`release_cached_outputs` unmaps every idle one, as
``torch.cuda.empty_cache`` does. ``HF_FDIV_TUNE_MALLOC=0`` turns it off too.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import threading

import torch
from torch import Tensor

__all__ = [
    "tune_cpu_allocator", "empty_like_output", "release_cached_outputs", "huge_pages_advised", "MMAP_THRESHOLD",
    "TRIM_THRESHOLD", "OUTPUT_CACHE_BYTES", "ENV_VAR",
]

ENV_VAR = "HF_FDIV_TUNE_MALLOC"
#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 << 20
#: freed heap memory kept for reuse: several chunks' temporaries
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MADV_HUGEPAGE = 14  # sys/mman.h
_PAGE = 4096
_HUGE_PAGE = 2 << 20
#: outputs' mappings the process keeps for reuse, in use and idle together (read at call time)
OUTPUT_CACHE_BYTES = 4 << 30
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

_state: dict = {}


def tune_cpu_allocator() -> bool:
    """Set glibc's mmap and trim thresholds once (see the module docstring). Returns True when they are
    set (now or earlier), False when disabled by ``HF_FDIV_TUNE_MALLOC=0`` or not on glibc."""
    if "tuned" in _state:
        return _state["tuned"]
    if _disabled():
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


def _disabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no")


def _madvise():
    """libc's madvise when transparent huge pages are in ``madvise`` mode on Linux, else None (once)."""
    if "madvise" not in _state:
        fn = None
        try:
            with open(_THP_MODE_FILE) as f:
                mode_is_madvise = "[madvise]" in f.read()
            if mode_is_madvise:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _state["madvise"] = fn
    return _state["madvise"]


def huge_pages_advised(t: Tensor) -> bool:
    """Advise huge pages for the whole pages of ``t``'s memory (a CPU tensor not yet written, at least
    ``MMAP_THRESHOLD`` bytes, so that it owns its mapping). True when the advice was given."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < MMAP_THRESHOLD or _disabled():
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    start = (t.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_PAGE - 1)
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0


class _OutputCache:
    """Anonymous mappings for outputs, reused once no tensor holds them (see the module docstring).

    A tensor made by ``torch.frombuffer`` holds a reference to its mapping until its storage is freed
    (every view and array shares that storage), so a mapping is idle exactly when the cache's own
    reference is the only one left."""

    def __init__(self):
        self.maps: list[mmap.mmap] = []
        self.lock = threading.Lock()
        probe = [mmap.mmap(-1, _PAGE)]  # the count of a mapping no tensor holds, read as _idle reads it
        self.idle_refs = sys.getrefcount(probe[0])
        probe[0].close()

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self.maps[i]) <= self.idle_refs

    def take(self, nbytes: int):
        """An idle mapping of ``nbytes`` rounded up to 2 MiB, a new one, or None when the cache is full."""
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        with self.lock:
            for i in range(len(self.maps)):
                if len(self.maps[i]) == size and self._idle(i):
                    return self.maps[i]
            total = sum(len(m) for m in self.maps)
            for i in reversed(range(len(self.maps))):
                if total + size <= OUTPUT_CACHE_BYTES:
                    break
                if self._idle(i):
                    total -= len(self.maps[i])
                    self.maps.pop(i).close()
            if total + size > OUTPUT_CACHE_BYTES:
                return None
            m = mmap.mmap(-1, size)
            if _madvise() is not None:
                m.madvise(mmap.MADV_HUGEPAGE)
            self.maps.append(m)
            return m

    def release(self) -> int:
        """Unmap every idle mapping; returns the bytes given back."""
        freed = 0
        with self.lock:
            for i in reversed(range(len(self.maps))):
                if self._idle(i):
                    freed += len(self.maps[i])
                    self.maps.pop(i).close()
        return freed


_cache = _OutputCache()


def release_cached_outputs() -> int:
    """Give the memory of idle cached outputs back to the system (as ``torch.cuda.empty_cache``); returns
    the bytes unmapped. Outputs still held by a tensor stay mapped."""
    return _cache.release()


def empty_like_output(x: Tensor, *, zero: bool = False) -> Tensor:
    """``torch.empty_like(x)`` (contiguous; zero-filled when ``zero``) for an output the size of the logits.
    On CPU, at least ``MMAP_THRESHOLD`` bytes: a cached mapping on huge pages, written before and so
    faulted in already when an earlier output of the same size is gone (see the module docstring)."""
    nbytes = x.numel() * x.element_size()
    if x.device.type == "cpu" and nbytes >= MMAP_THRESHOLD and not _disabled() and hasattr(mmap, "MADV_HUGEPAGE"):
        m = _cache.take(nbytes)
        if m is not None:
            out = torch.frombuffer(m, dtype=x.dtype, count=x.numel()).view(x.shape)
            return out.zero_() if zero else out
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    huge_pages_advised(out)
    return out.zero_() if zero else out
