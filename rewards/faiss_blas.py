"""faiss, loaded with the BLAS kernel this CPU can run.

The faiss-cpu wheel bundles its own OpenBLAS (0.3.15 in faiss-cpu 1.15),
whose CPU table predates recent processors: on one it does not know (this
project's 2-core Xeon with AVX-512, for one) it falls back to its Prescott
kernel, SSE3 only, and every exact search runs 2.5 times slower than the
CPU allows (64 queries over 1M vectors: 0.66 s instead of 0.27 s).
numpy's newer OpenBLAS detects the same CPU correctly.

So faiss is imported with ``OPENBLAS_CORETYPE`` naming the kernel of the
widest instruction set numpy found at run time (``SkylakeX`` for AVX-512,
``Haswell`` for AVX2 with FMA): only kernels the CPU and the OS really
support. numpy is imported first, so its own OpenBLAS has already read the
environment, and the variable is removed again once faiss is loaded, so no
other library or child process sees it. An operator's own
``OPENBLAS_CORETYPE`` is left alone. Only the speed changes: faiss proposes
candidates, and scores are recomputed exactly in float64
(``rewards.curiosity``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np  # noqa: F401 - loads numpy's own OpenBLAS before the variable is set


def openblas_core(features: Mapping[str, bool]) -> str | None:
    """The OpenBLAS kernel for numpy's run-time CPU features, or None for its own choice."""
    if features.get("AVX512_SKX"):  # AVX-512 F, CD, BW, DQ and VL, enabled by the OS
        return "SkylakeX"
    if features.get("AVX2") and features.get("FMA3"):
        return "Haswell"
    return None


def _cpu_features() -> Mapping[str, bool]:
    """What numpy found this CPU (and the OS) to support, e.g. ``{"AVX2": True, ...}``."""
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # pragma: no cover - numpy < 2
        return {}
    return dict(getattr(umath, "__cpu_features__", {}))


def _load() -> Any:
    core = None if "OPENBLAS_CORETYPE" in os.environ else openblas_core(_cpu_features())
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        if core is not None:
            del os.environ["OPENBLAS_CORETYPE"]
    return faiss


faiss = _load()
