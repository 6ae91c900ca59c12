"""A loader with two persistent workers in a process of its own, for tests/test_stream.py. It prints
the workers' pids (one JSON line) once they have delivered batches, reads a line from stdin, then by
``mode``: ``raise`` fails with the loader alive (a traceback, as a crashing script or test leaves),
``drop`` drops the loader, prints ``dropped`` and waits, ``kill`` waits (to be killed), ``signals``
takes two more batches after the SIGINT and SIGTERM its handlers recorded (as the trainer does
before it saves), prints them and ends normally with the loader alive."""

import gc
import json
import multiprocessing
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import load_processor  # noqa: E402
from pipeline.stream import make_loader  # noqa: E402


def main() -> None:
    urls, mode = sys.argv[1:3]
    loader = make_loader(urls, load_processor("tiny").tokenizer, batch_size=2, num_workers=2,
                         persistent_workers=True, infinite=True)
    batches = iter(loader)
    next(batches), next(batches)
    received = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: received.append(signal.Signals(number).name))
    print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
    sys.stdin.readline()
    if mode == "raise":
        raise RuntimeError("a failure with the loader alive")
    if mode == "drop":
        del batches, loader
        gc.collect()
        print("dropped", flush=True)
    if mode == "signals":
        next(batches), next(batches)
        print(json.dumps(received), flush=True)
        return
    time.sleep(120)


if __name__ == "__main__":
    main()
