"""glibc malloc settings for training on CPU: the next step reuses the memory the last one freed.

XLA:CPU allocates the temporaries of a step as one buffer (167 MiB for the demo's 8 x 256 step).
glibc serves any request above its largest mmap threshold (32 MiB) with a fresh mmap and returns
it with munmap when it is freed, so every step faults in and zeroes the whole buffer again: a
quarter of the demo process's CPU time was the kernel's page faults, and its step took 267-340 ms
on the user's path against 167-187 ms without them (docs/performance.md). With one malloc arena,
no mmap and no trimming, a freed buffer stays in the heap and the next step takes it again. The
cost is host memory that is never given back: peak RSS 1.45 -> 1.90 GiB for the demo, 3.83 ->
7.90 GiB for the 49M ladder row, whose compute-bound step gains nothing (train larger sizes on a
host short of memory with T5X_CPT_HOST_MALLOC=default).

A thread keeps the arena it first allocated from, so the settings must come before the process
starts threads: `t5x_cpt/__init__.py` applies them on import, before jax or TensorFlow load.

    T5X_CPT_HOST_MALLOC=auto     (default) apply on Linux/glibc hosts that train on CPU: no
                                 accelerator device files, or JAX_PLATFORMS=cpu
    T5X_CPT_HOST_MALLOC=reuse    apply whatever the host
    T5X_CPT_HOST_MALLOC=default  leave malloc alone (an accelerator host, or LD_PRELOADed
                                 tcmalloc/jemalloc, which keep freed memory anyway)
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV = "T5X_CPT_HOST_MALLOC"
CHOICES = ("auto", "reuse", "default")
# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Device files of the accelerators JAX drives: TPU v2-v4, TPU v5 and later, NVIDIA, AMD.
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

# What configure() decided, for the run's start-up log.
status = "not configured"


def _trains_on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(","))
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def _is_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # the name unknown here, or not answered (musl)
        return False


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def configure() -> str:
    """Applies the settings when T5X_CPT_HOST_MALLOC asks for them; returns (and keeps) what it did."""
    global status
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        status = f"left as is ({ENV}={choice!r} is not one of {', '.join(CHOICES)})"
    elif choice == "default" or (choice == "auto" and not _trains_on_cpu()):
        status = f"left as is ({ENV}={choice}" + (", an accelerator host)" if choice == "auto" else ")")
    elif not _is_glibc():
        status = "left as is (not glibc)"
    else:
        libc = ctypes.CDLL(None)
        applied = (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                   and libc.mallopt(_M_TRIM_THRESHOLD, -1))  # -1: the largest size_t, never trim
        threads = _thread_count()
        status = ("one arena, no mmap, no trimming: freed step buffers are reused "
                  f"({ENV}=default turns this off)" if applied else "left as is (mallopt refused the settings)")
        if applied and threads > 1:
            status += f"; {threads - 1} thread(s) had started before, and may keep their own arenas"
    return status
