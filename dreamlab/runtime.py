"""How a dreamlab process uses the CPU cores and memory it shares with others. Standard library only: the OpenMP
setting must be in the environment before torch loads its thread pool, so it is applied when `dreamlab` is imported
(`dreamlab/__init__.py`, which every package of ours imports before torch) and again by the CLI.

Two defaults, both measured by `bench/trainer_bench.py` (tables in docs/scale.md):

* `OMP_WAIT_POLICY=PASSIVE`: torch keeps one OpenMP thread per core, but a thread that finishes its share of an
  operation sleeps instead of spinning. With the runtime's default spin, two threads of one process burn whole time
  slices waiting for each other whenever any other process holds a core: training the VAE on 2 shared cores ran at
  0.14-0.19 steps/s with the default policy and 1.11-1.20 with PASSIVE. Waking a sleeping thread costs a little
  per parallel region on an idle machine (not measured: no idle machine was available). An explicit
  `OMP_WAIT_POLICY` wins; `OMP_NUM_THREADS` or `--set threads=N` set the thread count.
* glibc keeps freed memory (`mallopt`): by default a freed block above a moving threshold (128 KiB to 32 MiB) goes
  back to the kernel, and the next step's tensors fault it in again page by page: 31,508 page faults per VAE step
  in a plain loop against 31 with this setting (1.7x the steps/s in that run), an amount that depends on the
  process's allocation history. Blocks up to 32 MiB now stay in the heap and up to 1 GiB of free heap is kept, as
  PyTorch's CUDA allocator keeps GPU memory. Explicit `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` win.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
_malloc_done = False


def set_thread_env() -> None:
    """OpenMP threads wait passively (see the module docstring); effective only before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed tensor memory in the process (see the module docstring). Returns whether
    the setting is in force: False off glibc or where the user set glibc's own MALLOC_* variables."""
    global _malloc_done
    if _malloc_done:
        return True
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _malloc_done


def cpu_defaults() -> None:
    """Both defaults; what the CLI and the trainer call."""
    set_thread_env()
    keep_freed_memory()
