"""The glibc malloc settings of t5x_cpt/host_malloc.py: when they apply, and what they buy.

Each case is a fresh process (the settings are process-wide and made on `import t5x_cpt`). The
probe does what XLA:CPU does every step: a worker thread allocates a large buffer, writes it and
frees it; another worker thread then allocates and writes one of the same size. With the settings
the second buffer is the first one again, in the heap, and writing it faults in almost no pages;
without them glibc maps and unmaps a fresh region each time.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 96 << 20  # above glibc's largest mmap threshold (32 MiB), like the demo step's 167 MiB

PROBE = r"""
import ctypes, json, resource, sys, threading
import t5x_cpt.host_malloc as host_malloc

size = int(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
result = {"status": host_malloc.status}

def heap_span():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = line.split()[0].split("-")
            return int(low, 16), int(high, 16)
    return 0, 0

def step(name):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    low, high = heap_span()
    result[name] = {"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                    "in_heap": low <= address < high}
    libc.free(address)

for name in ("first", "second"):
    worker = threading.Thread(target=step, args=(name,))
    worker.start()
    worker.join()
print(json.dumps(result))
"""


def probe(**env):
    environment = {k: v for k, v in os.environ.items() if k not in ("T5X_CPT_HOST_MALLOC", "JAX_PLATFORMS")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", PROBE, str(SIZE)], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("env", [{"JAX_PLATFORMS": "cpu"}, {"T5X_CPT_HOST_MALLOC": "reuse", "JAX_PLATFORMS": "tpu"}])
def test_on_cpu_hosts_a_freed_step_buffer_is_reused_without_page_faults(env):
    result = probe(**env)
    assert result["status"].startswith("one arena, no mmap, no trimming"), result["status"]
    pages = SIZE // os.sysconf("SC_PAGE_SIZE")
    assert result["second"]["in_heap"]
    assert result["second"]["faults"] < pages // 20, result  # the first buffer, already faulted in


@pytest.mark.parametrize("env, reason", [
    ({"T5X_CPT_HOST_MALLOC": "default", "JAX_PLATFORMS": "cpu"}, "T5X_CPT_HOST_MALLOC=default"),
    ({"JAX_PLATFORMS": "tpu"}, "an accelerator host"),
    ({"JAX_PLATFORMS": "cpu,cuda"}, "an accelerator host"),
])
def test_accelerator_hosts_and_the_opt_out_leave_malloc_alone(env, reason):
    result = probe(**env)
    assert result["status"].startswith("left as is") and reason in result["status"], result["status"]
    assert not result["first"]["in_heap"] and not result["second"]["in_heap"]  # glibc's own: a fresh mmap


def test_an_unknown_setting_is_named_and_changes_nothing():
    result = probe(T5X_CPT_HOST_MALLOC="always", JAX_PLATFORMS="cpu")
    assert "'always' is not one of auto, reuse, default" in result["status"]
    assert not result["second"]["in_heap"]
