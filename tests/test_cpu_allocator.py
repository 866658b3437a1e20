"""The glibc tuning of :mod:`hf_fdiv.solver.cpu_allocator` (issue 22): with it, a chunk's freed
temporaries are reused without page faults; without it (``HF_FDIV_TUNE_MALLOC=0``) every round of
8 MiB temporaries faults its pages in again in some processes and not in others, depending on where
address-space layout randomisation put the heap (the cause of the benchmark's process-to-process
spread). Counted with getrusage in fresh processes; with randomisation turned off for the child
(personality ADDR_NO_RANDOMIZE) the untuned allocator faults in nearly every process."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's"
)

SCRIPT = """
import resource, torch, hf_fdiv
x = torch.randn(64, 1000)
hf_fdiv.fdiv_loss(x, torch.zeros(64, dtype=torch.long), "js")  # the first CPU solve tunes
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def chunk_temporaries():
    bufs = [torch.empty(2 << 20).fill_(1.0) for _ in range(4)]  # 4 x 8 MiB
    del bufs
for _ in range(3):
    chunk_temporaries()
start = faults()
for _ in range(10):
    chunk_temporaries()
print(hf_fdiv.solver.tune_cpu_allocator(), (faults() - start) / 10)
"""


ADDR_NO_RANDOMIZE = 0x0040000


def _no_aslr():
    ctypes.CDLL(None).personality(ADDR_NO_RANDOMIZE)  # inherited by the exec that follows


def _faults_per_round(tune: str, aslr: bool = True) -> tuple[str, float]:
    env = dict(os.environ, HF_FDIV_TUNE_MALLOC=tune)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
        preexec_fn=None if aslr else _no_aslr,
    )
    tuned, faults = out.stdout.split()
    return tuned, float(faults)


@pytest.mark.slow
def test_untuned_allocator_faults_every_round_in_some_processes():
    # the pages of 4 x 8 MiB freed temporaries (8 192), faulted in again every round, in most layouts
    # (without randomisation nearly always; a process may still draw a layout that reuses them)
    runs = [_faults_per_round("0", aslr=False) for _ in range(3)]
    assert all(tuned == "False" for tuned, _ in runs)  # HF_FDIV_TUNE_MALLOC=0 turns the tuning off
    assert max(faults for _, faults in runs) > 4000


def test_tuned_allocator_reuses_freed_chunk_memory_in_every_layout():
    tuned, faults = _faults_per_round("1", aslr=False)
    assert tuned == "True"
    assert faults < 100
    for _ in range(3):  # randomised layouts, as users run
        assert _faults_per_round("1")[1] < 100


# ---- huge pages for the outputs (empty_like_output) ------------------------------------------

def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


def _vm_flags(t) -> list[str]:
    """The VmFlags of the mapping holding t's middle byte (/proc/self/smaps; the advice covers whole
    pages, so the page that t shares with the allocator's header is not advised); 'hg': huge pages advised."""
    ptr, flags, inside = t.data_ptr() + t.numel() * t.element_size() // 2, None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    assert flags is not None, "no mapping holds the tensor"
    return flags


needs_madvise_mode = pytest.mark.skipif(
    "[madvise]" not in _thp_mode(), reason="transparent huge pages are not in madvise mode here"
)


@needs_madvise_mode
def test_outputs_of_the_logits_size_are_advised_huge_pages(monkeypatch):
    import torch

    import hf_fdiv
    from hf_fdiv.solver import empty_like_output

    monkeypatch.delenv("HF_FDIV_TUNE_MALLOC", raising=False)
    x = torch.randn(512, 32768)  # 64 MiB: above the mmap threshold, its own mapping
    assert "hg" in _vm_flags(empty_like_output(x))
    assert "hg" not in _vm_flags(torch.empty_like(x))  # the control: torch's own allocation is not
    # what users get: the operator's output, its input gradient, the loss's gradient
    xr = x.clone().requires_grad_()
    p = hf_fdiv.f_softargmax(xr, "alpha:1.5")
    p.backward(torch.randn_like(p))
    assert "hg" in _vm_flags(p) and "hg" in _vm_flags(xr.grad)
    xr.grad = None
    hf_fdiv.fdiv_loss(xr, torch.randint(0, 32768, (512,)), "js").backward()
    assert "hg" in _vm_flags(xr.grad)


@needs_madvise_mode
def test_huge_page_advice_is_off_with_the_switch(monkeypatch):
    import torch

    from hf_fdiv.solver import empty_like_output

    monkeypatch.setenv("HF_FDIV_TUNE_MALLOC", "0")
    assert "hg" not in _vm_flags(empty_like_output(torch.empty(512, 32768)))
    assert empty_like_output(torch.empty(3, 5), zero=True).eq(0).all()


# ---- the output cache (empty_like_output) ------------------------------------------------------


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_an_output_of_a_freed_size_reuses_its_mapping_without_faults(monkeypatch):
    """The next output of the same size after the last tensor on a mapping is gone (views included)
    gets that mapping back, faulted in already: a 64 MiB output written again costs no page faults."""
    import torch

    from hf_fdiv.solver import empty_like_output, release_cached_outputs

    monkeypatch.delenv("HF_FDIV_TUNE_MALLOC", raising=False)
    release_cached_outputs()
    x = torch.empty(512, 32768)
    first = empty_like_output(x)
    first.fill_(1.0)
    ptr, view = first.data_ptr(), first[7:9]
    del first
    busy = empty_like_output(x)  # a view still holds the first mapping: a new one
    assert busy.data_ptr() != ptr and view.eq(1.0).all()
    del busy, view
    start = _minor_faults()
    again = empty_like_output(x)
    again.fill_(2.0)
    assert again.data_ptr() == ptr and _minor_faults() - start < 64  # 16 384 small pages when fresh
    zeroed = empty_like_output(torch.empty(512, 32768, dtype=torch.bfloat16), zero=True)
    assert zeroed.dtype == torch.bfloat16 and zeroed.shape == (512, 32768) and zeroed.eq(0).all()
    del again, zeroed
    # idle now: the first 64 MiB mapping (again's), busy's 64 MiB one and zeroed's 32 MiB one
    assert release_cached_outputs() >= 160 << 20


def test_a_held_output_keeps_its_values_while_others_are_made(monkeypatch):
    """An operator's output that the caller keeps is never handed out again: later calls of the same
    size write elsewhere, and the kept values stay those of their own call."""
    import torch

    import hf_fdiv

    monkeypatch.delenv("HF_FDIV_TUNE_MALLOC", raising=False)
    torch.manual_seed(0)
    x = torch.randn(256, 32768) * 2  # 32 MiB: the smallest cached output
    kept = [hf_fdiv.f_softargmax(x + k, "js") for k in range(3)]
    kept.append(hf_fdiv.f_softargmax(x * 3, "js"))
    assert len({p.data_ptr() for p in kept}) == 4
    want = hf_fdiv.f_softargmax(x.double(), "js")
    for p in kept[:3]:  # x + k: the same softargmax (shift invariance), each in its own mapping
        torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept[3].double(), hf_fdiv.f_softargmax(x.double() * 3, "js"), atol=1e-6, rtol=1e-5)


def test_the_cache_stays_within_its_budget(monkeypatch):
    """Beyond ``OUTPUT_CACHE_BYTES`` idle mappings of other sizes are unmapped first, then outputs are plain
    allocations; with the switch off nothing is cached."""
    import torch

    from hf_fdiv.solver import cpu_allocator, empty_like_output, release_cached_outputs

    monkeypatch.delenv("HF_FDIV_TUNE_MALLOC", raising=False)
    release_cached_outputs()
    monkeypatch.setattr(cpu_allocator, "OUTPUT_CACHE_BYTES", 100 << 20)
    a = empty_like_output(torch.empty(256, 32768))  # 32 MiB
    b = empty_like_output(torch.empty(256, 32768))  # 64 MiB in the cache
    del a
    c = empty_like_output(torch.empty(384, 32768))  # 48 MiB: the idle 32 MiB one is unmapped for it
    assert sorted(len(m) >> 20 for m in cpu_allocator._cache.maps) == [32, 48]
    d = empty_like_output(torch.empty(384, 32768))  # no room, nothing idle: a plain allocation
    assert sorted(len(m) >> 20 for m in cpu_allocator._cache.maps) == [32, 48]
    assert all(d.data_ptr() != t.data_ptr() for t in (b, c))
    monkeypatch.setenv("HF_FDIV_TUNE_MALLOC", "0")
    del b
    e = empty_like_output(torch.empty(256, 32768))
    assert sorted(len(m) >> 20 for m in cpu_allocator._cache.maps) == [32, 48]  # the idle 32 MiB one unused
    del c, d, e
    monkeypatch.delenv("HF_FDIV_TUNE_MALLOC")
    assert release_cached_outputs() == 80 << 20 and cpu_allocator._cache.maps == []
