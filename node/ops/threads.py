"""Named threads, the CPU time spent by each name, and the C heap (Linux; elsewhere no-ops).

The node names its threads (``poc-loop``, ``poc-store``, ``poc-work``,
``poc-encoder``, ...) so that ``top -H``, ``py-spy`` and the
``poc_stage_cpu_seconds_total`` metric can tell them apart. A thread a named
thread starts inherits its name: torch's worker threads, started by the
encoder thread, count as ``poc-encoder``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

_PR_SET_NAME = 15
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
P = ParamSpec("P")
T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def name_thread(name: str) -> None:
    """Name the calling thread (at most 15 bytes survive)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: names are cosmetic
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def threads_cpu_seconds(name: str) -> float:
    """User + system CPU time of this process's live threads called ``name``."""
    total = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if (task / "comm").read_text().rstrip("\n") != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def thread_cpu_timed(
    add: Callable[[float], None], fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(*args)``; then ``add`` the CPU time this thread spent in it (even if it raised)."""
    started = time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        add(time.thread_time() - started)


class CoroutineCpu(Generic[T]):
    """Await ``coroutine`` and ``add`` the CPU time this thread spent running it.

    Only its own steps count: each stretch from a resumption to its next
    suspension, never the time other tasks run while it waits. (``thread_time``
    around an ``await`` would count everything the event loop did meanwhile.)
    Its result, its exceptions and a cancellation pass through unchanged.
    """

    def __init__(self, coroutine: Coroutine[Any, Any, T], add: Callable[[float], None]) -> None:
        self._coroutine = coroutine
        self._add = add

    def __await__(self) -> Generator[Any, Any, T]:
        coroutine = self._coroutine
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            started = time.thread_time()
            try:
                yielded = coroutine.send(sent) if thrown is None else coroutine.throw(thrown)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            finally:
                self._add(time.thread_time() - started)
            try:
                sent, thrown = (yield yielded), None
            except GeneratorExit:  # the awaiting task was closed
                coroutine.close()
                raise
            except BaseException as error:  # a cancellation, or what the awaited future raised
                sent, thrown = None, error


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 32 << 20
"""Allocations up to this size come from the heap (glibc's largest allowed value)."""
HEAP_TRIM_THRESHOLD = 256 << 20
"""Free memory the heap keeps at its top before returning it to the system."""


def reuse_heap(
    mmap_threshold: int = HEAP_MMAP_THRESHOLD, trim_threshold: int = HEAP_TRIM_THRESHOLD
) -> None:
    """Let glibc's heap keep freed memory for the next batch (glibc; elsewhere a no-op).

    By default glibc serves allocations above a moving threshold with fresh
    ``mmap`` pages and gives freed heap tops back at once, so every encoder
    batch faults its working memory in anew: about 1,500 page faults and
    2.8 ms of system time per item, 12 % of an encoder worker's CPU
    (``bench/bench_e2e.py``). Fixed thresholds let the next batch reuse the
    memory the last one freed; ``trim_heap`` still returns it now and then.
    Call it at a process's start, before the large allocations. Allocations
    above ``mmap_threshold`` still get their own pages; at most
    ``trim_threshold`` of free memory stays at the heap's top.
    """
    with contextlib.suppress(AttributeError, OSError):
        _libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        _libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc; elsewhere a no-op)."""
    with contextlib.suppress(AttributeError, OSError):
        _libc.malloc_trim(0)
