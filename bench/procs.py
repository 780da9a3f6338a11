"""What a process tree costs, read from /proc (Linux): RSS and CPU, by process name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> Iterator[int]:
    """``pid`` and every live descendant (children of every thread)."""
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        yield current


def name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def rss_kib_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_of(pid: int, *, reaped: bool = False) -> float:
    """User + system seconds (with ``reaped``: also of its children that ended)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11 : 15 if reaped else 13]) / TICK


def by_name(pid: int, measure: str, *, root: bool = True) -> dict[str, float]:
    """``measure`` ("rss" KiB or "cpu" seconds) of the tree, summed by process name."""
    out: dict[str, float] = {}
    for current in tree(pid):
        if current == pid and not root:
            continue
        try:
            value = rss_kib_of(current) if measure == "rss" else cpu_of(current)
            key = name(current)
        except OSError:  # it ended meanwhile
            continue
        out[key] = out.get(key, 0.0) + value
    return out


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants, in KiB."""
    return int(sum(by_name(pid, "rss").values()))


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and every descendant, alive or reaped."""
    total = 0.0
    for current in tree(pid):
        try:
            total += cpu_of(current, reaped=True)
        except OSError:
            continue
    return total


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the process's threads by name (its main thread is "loop")."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            key = "loop" if task.name == str(pid) else (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out
