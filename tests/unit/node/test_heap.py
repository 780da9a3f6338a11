"""The encoder workers' heap keeps freed memory for the next batch (glibc)."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

_PROBE = """
import ctypes, ctypes.util, resource, sys
from node.ops.threads import reuse_heap
if sys.argv[1] == "reuse":
    reuse_heap()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # a batch's working memory: tensors allocated, touched, freed
    blocks = [libc.malloc(4 << 20) for _ in range(6)]
    for block in blocks:
        libc.memset(block, 1, 4 << 20)
    for block in blocks:
        libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_reused_heap_does_not_fault_each_batch_in_anew():
    batch_pages = (6 * (4 << 20)) // resource.getpagesize()
    # glibc's default gives the freed heap top back after every batch (it is
    # above twice the moving mmap threshold), so each batch faults it in anew.
    assert _faults("default") > 20 * batch_pages
    assert _faults("reuse") < 3 * batch_pages  # the first batch's pages, then reused
