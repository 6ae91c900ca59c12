"""DataLoader workers that never outlive their loader or the process that started them.

Workers ignore SIGINT/SIGTERM (the main process handles them); each runs a thread that ends it as
soon as its parent is gone or its loader's shared flag is set, and this process sets every flag at
exit. Why not ``PR_SET_PDEATHSIG``, and what hung before: docs/streaming.md, "Worker lifetime".
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  its exit handler must be registered before ours (below)
import os
import signal
import threading
import time
import weakref

import torch

WATCH_INTERVAL = 0.1  # seconds between a worker's looks at its parent and its loader's flag

_FLAGS: weakref.WeakSet = weakref.WeakSet()  # this process's loaders' flags


def exit_flag() -> torch.Tensor:
    """A new loader's flag, shared with its workers (``worker_init``): set, they exit."""
    flag = torch.zeros(1, dtype=torch.int32).share_memory_()
    _FLAGS.add(flag)
    return flag


def worker_init(flag: torch.Tensor, worker_id: int) -> None:
    """``worker_init_fn=functools.partial(worker_init, exit_flag())``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch, args=(os.getppid(), flag), name="exit-with-parent", daemon=True).start()


def _watch(parent: int, flag: torch.Tensor) -> None:
    while os.getppid() == parent and not flag.item():
        time.sleep(WATCH_INTERVAL)
    os._exit(0)  # 0: the main process's SIGCHLD handler takes any other status for a crashed worker


def _end_all_workers() -> None:
    for flag in list(_FLAGS):
        flag.fill_(1)


# atexit runs the last registered first: this runs before multiprocessing's join of the workers.
atexit.register(_end_all_workers)
