"""Decoder helper processes exit when the process that started them is gone.

A node killed with SIGKILL cannot stop its decoder processes, and a
``ProcessPoolExecutor`` worker never notices on its own (it holds both ends
of its call queue). Importing this module starts a thread that ends the
process as soon as its parent changes (the parent died and it was
re-parented). The forkserver imports it as a preload; each decoder worker
starts the same watch from its initializer. The node itself never imports it.
"""

from __future__ import annotations

import os
import threading
import time


def _watch(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def watch_parent() -> None:
    """End this process when its current parent exits."""
    threading.Thread(target=_watch, args=(os.getppid(),), name="orphan-guard", daemon=True).start()


watch_parent()
