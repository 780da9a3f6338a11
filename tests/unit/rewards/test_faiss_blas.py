"""faiss runs the BLAS kernel of the CPU it is on, not its bundled OpenBLAS's SSE3 fallback."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.faiss_blas import _cpu_features, faiss, openblas_core

ROOT = Path(__file__).resolve().parents[3]


def faiss_blas_core() -> str | None:
    """The kernel faiss's OpenBLAS runs (``openblas_get_corename``), read from the
    library as this process mapped it."""
    assert faiss is not None  # loaded, and its OpenBLAS with it
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line and "faiss" in line}
    for path in sorted(paths):
        try:
            name = ctypes.CDLL(path).openblas_get_corename
        except (OSError, AttributeError):
            continue
        name.restype = ctypes.c_char_p
        return str(name().decode())
    return None


def test_the_kernel_follows_the_widest_instruction_set_numpy_found() -> None:
    skx = {"AVX2": True, "FMA3": True, "AVX512F": True, "AVX512_SKX": True}
    assert openblas_core(skx) == "SkylakeX"
    assert openblas_core({"AVX2": True, "FMA3": True, "AVX512F": True}) == "Haswell"
    assert openblas_core({"AVX2": True, "FMA3": False}) is None
    assert openblas_core({}) is None


@pytest.mark.skipif("OPENBLAS_CORETYPE" in os.environ, reason="the operator chose a kernel")
def test_faiss_searches_with_the_kernel_of_this_cpu() -> None:
    """On this machine faiss's OpenBLAS 0.3.15 alone picks Prescott (SSE3): 2.5x slower."""
    wanted = openblas_core(_cpu_features())
    if wanted is None:
        pytest.skip("no AVX2 here: OpenBLAS keeps its own choice")
    assert faiss_blas_core() == wanted
    assert "OPENBLAS_CORETYPE" not in os.environ  # nothing else, no child process, sees it


def test_an_operators_own_kernel_is_kept() -> None:
    code = (
        "import os; from tests.unit.rewards.test_faiss_blas import faiss_blas_core; "
        "print(faiss_blas_core(), os.environ['OPENBLAS_CORETYPE'])"
    )
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["Prescott", "Prescott"]
