"""Process-wide CPU settings for training, evaluation and benchmarks: :func:`tune_cpu` = :func:`tune_cpu_allocator`
+ flushing denormal floats.

``tune_cpu_allocator()`` stops glibc's malloc from handing large tensors' memory back to the kernel. PyTorch
allocates CPU tensors with ``posix_memalign``; glibc serves requests above its mmap threshold (at most 32 MiB) with
fresh ``mmap`` pages that ``free`` unmaps again, and trims the top of the heap whenever enough freed memory gathers
there. Every such allocation then pays one page fault per 4 KiB page when it is first written: a ``clone()`` of a
(8, 384, 56, 56) float32 tensor (38.5 MB, CoAtNet-0's expanded MBConv activation at batch 8) costs 9409 minor faults
every call (``getrusage``), i.e. milliseconds of kernel time per activation, on every training step.
With the tuning, memory freed by one step is reused by the next, fault-free.

The cost: the process keeps the peak of its heap until it exits. The CLI applies :func:`tune_cpu` on start-up (set
``HYBRIDVISION_MALLOC_TUNING=0`` to keep glibc's and torch's defaults); benchmarks apply it to both sides of a
comparison.
Library users call it themselves, once, at the start of a CPU job.

:func:`cpu_state` names the settings in effect, and the pages large tensors sit on (:func:`large_tensor_pages`):
torch's allocator puts allocations of 2 MiB and more on transparent huge pages where ``THP_MEM_ALLOC_ENABLE=1`` is
set before its first CPU allocation, and memory-bound ops then run faster on VMs, where every TLB miss walks two page
tables: a 256 MiB ``copy_`` (2 threads, Zen 4 VM, 2026-12-03, five alternating pairs of processes, scratch) ran at
28.0-46.8 GB/s with it and 24.8-29.7 GB/s without; a CoAtNet-0 training step (batch 8) showed no consistent
difference (1.47-1.83 s against 1.51-1.79 s, four alternating pairs, scratch). Nothing here sets it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

__all__ = ["ENV_VAR", "cpu_state", "large_tensor_pages", "tune_cpu", "tune_cpu_allocator"]

ENV_VAR = "HYBRIDVISION_MALLOC_TUNING"

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps
_applied = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc): every allocation from the heap (``M_MMAP_MAX=0``), the heap
    never trimmed (``M_TRIM_THRESHOLD`` = max) and grown in 64 MiB steps (``M_TOP_PAD``).

    Idempotent. Returns True when the settings are in effect (Linux with glibc), False where there is no glibc
    ``mallopt`` or ``HYBRIDVISION_MALLOC_TUNING=0`` is set.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, _TOP_PAD)))
    _applied = ok
    return ok


def tune_cpu() -> None:
    """:func:`tune_cpu_allocator` plus ``torch.set_flush_denormal(True)``: denormal floats (magnitudes below
    1.2e-38) take a slow microcode path on x86; flushing changes results only below 1.2e-38. The flush is a
    safeguard: ``python benchmarks/profile_train_step.py`` with and without ``--keep-denormals`` showed no
    consistent effect on CoAtNet-0 training here. Both settings follow ``HYBRIDVISION_MALLOC_TUNING`` (``0`` keeps
    torch's and glibc's defaults).

    Call it before the first multi-threaded torch op: the flush is a per-thread CPU flag, and torch's intra-op
    worker threads copy it from the main thread only when they are created (at the first parallel op); a later call
    flushes in the main thread alone (:func:`cpu_state` then says so)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return
    tune_cpu_allocator()
    torch.set_flush_denormal(True)


def large_tensor_pages() -> str:
    """The pages an 8 MiB tensor allocated (and written) now sits on: ``"2 MiB pages"`` where its mapping holds
    transparent huge pages (``AnonHugePages`` in ``/proc/self/smaps``), ``"4 KiB pages"`` where it holds none,
    ``"pages unknown"`` where that file cannot be read (not Linux)."""
    t = torch.ones(1 << 21)
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                field = line.split()
                if not field:
                    continue
                if "-" in field[0] and not field[0].endswith(":"):  # a mapping's header: start-end perms ...
                    lo, hi = (int(a, 16) for a in field[0].split("-"))
                    inside = lo <= addr < hi
                elif inside and field[0] == "AnonHugePages:":
                    return "2 MiB pages" if int(field[1]) > 0 else "4 KiB pages"
    except (OSError, ValueError, IndexError):
        pass
    return "pages unknown"


def cpu_state() -> str:
    """One phrase for benchmark headers: which of :func:`tune_cpu`'s settings are in effect in this process, and
    :func:`large_tensor_pages`."""
    malloc = "malloc tuned" if _applied else "glibc malloc defaults"
    # big enough that every intra-op thread multiplies a share (torch's grain size is 32768 elements)
    zeros = ((torch.full((1 << 20,), 1e-30) * 1e-10) == 0).float().mean().item()
    ftz = {1.0: "denormals flushed", 0.0: "denormals kept"}.get(zeros, "denormals flushed in the main thread only")
    return f"{malloc}, {ftz}, large tensors on {large_tensor_pages()} (hybridvision.engine.runtime)"
