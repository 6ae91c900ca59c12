"""Batches from the loader onto the device ahead of the step that needs them, so receiving them and
copying them overlap the step before: a background thread receives them, a side CUDA stream copies
batch k+1 while step k runs (on the CPU batches pass as they come), and only ``DEVICE_KEYS`` move.
Why: docs/streaming.md, "Onto the device".
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch

DEVICE_KEYS = ("input_features", "pad_values", "labels", "decoder_input_ids")
_END = object()


def in_background(batches: Iterable, depth: int = 2) -> Iterator:
    """``batches``, taken from their iterator by a thread that keeps up to ``depth`` of them ready;
    an error the iterator raises comes out here, after the batches before it."""
    ready, stop = queue.Queue(maxsize=depth), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # the consumer may be gone: look at ``stop`` now and then
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((_END, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))

    thread = threading.Thread(target=pull, name="batches-in-background", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is _END:
                return
            yield batch
    finally:
        stop.set()
        thread.join()


def to_device_ahead(batches: Iterable[dict], device) -> Iterator[dict]:
    """``batches`` with their ``DEVICE_KEYS`` tensors on ``device`` (None: left where they are),
    each copy issued one batch ahead on a side stream when ``device`` is a CUDA device."""
    if device is None or torch.device(device).type != "cuda":
        for batch in batches:
            yield _moved(batch, device)
        return
    device = torch.device(device)
    side, ahead = torch.cuda.Stream(device), None
    for batch in batches:
        with torch.cuda.stream(side):
            moved = _moved(batch, device)
            copied = side.record_event()
        if ahead is not None:
            yield _ready(*ahead, device)
        ahead = moved, copied
    if ahead is not None:
        yield _ready(*ahead, device)


def _moved(batch: dict, device) -> dict:
    return {**batch, **{key: batch[key].to(device, non_blocking=True) for key in DEVICE_KEYS if key in batch}}


def _ready(batch: dict, copied: torch.cuda.Event, device: torch.device) -> dict:
    stream = torch.cuda.current_stream(device)
    stream.wait_event(copied)
    for key in DEVICE_KEYS:
        if key in batch:
            batch[key].record_stream(stream)
    return batch
