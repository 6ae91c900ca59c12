"""DataLoader workers that never outlive their loader or the process that started them.

Workers share the main process's group, so a Ctrl-C or a preemption SIGTERM reaches them too; they
ignore both, and the main process handles them (the trainer saves, then stops). Ignoring SIGTERM has
two costs this module removes:

* At exit, ``multiprocessing`` ends daemonic children with SIGTERM and then joins them: workers of a
  loader still alive then (one held by a traceback, a failed test's frame) were never ended, and the
  process hung in that join.
* A main process killed outright (SIGKILL, a second signal) left its workers to torch's watchdog,
  which looks only between batches and every 5 s.

So each worker runs a thread that ends it (``os._exit``) as soon as its parent is gone or its
loader's shared flag is set, and this process sets every loader's flag at exit, before
``multiprocessing`` joins them. Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the
worker ends, and a loader may be iterated from a thread that ends before it.
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
