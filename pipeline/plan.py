"""The epoch plan of a shard stream: which positions of an epoch each source, rank, worker, shuffle
block and length-bucketing pool has, in what order, and what a saved position has delivered. Pure
numpy arithmetic on sample counts and seeds (no data read, no torch); ``pipeline.stream`` reads what
it says. docs/streaming.md describes the plan.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

STRIDE = 4096  # epoch positions between the per-source pick counts an EpochPicks keeps


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class EpochPicks:
    """Which source each position of one epoch is, and per source its picks before every
    ``STRIDE``-th position (so the picks before any position cost at most ``STRIDE`` to count)."""

    epoch: int
    sources: np.ndarray  # [N] int16: the source of each position
    marks: np.ndarray  # [N // STRIDE + 1, sources]

    @classmethod
    def of(cls, epoch: int, sources: np.ndarray, count: int) -> EpochPicks:
        marks = np.zeros((len(sources) // STRIDE + 1, count), dtype=np.int64)
        for source in range(count):
            marks[1:, source] = np.cumsum(sources == source)[STRIDE - 1::STRIDE][:len(marks) - 1]
        return cls(epoch, sources, marks)

    def before(self, position: int) -> np.ndarray:
        """``[sources]``: each source's positions among the epoch's first ``position``."""
        block = position // STRIDE
        return self.marks[block] + np.bincount(self.sources[block * STRIDE:position], minlength=self.marks.shape[1])


@dataclass(frozen=True)
class Mix:
    """The sources of a stream and their share of each of its epochs (docs/streaming.md, 'Sources and
    mixing')."""

    names: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]  # per source: its shards' sample counts, in listed order
    quotas: tuple[int, ...]  # per source: its positions in every epoch of the stream (m_s)

    @classmethod
    def weighted(cls, names: list[str], counts: list[list[int]], weights: list[float]) -> Mix:
        """Quotas by largest remainder of the weights' shares of all the sources' samples; ValueError
        naming a source that has no samples or whose weight leaves it no position."""
        sizes = [sum(c) for c in counts]
        empty = [n for n, size in zip(names, sizes) if size == 0]
        if empty:
            raise ValueError(f"source(s) {empty} have no samples")
        total, weight = sum(sizes), sum(weights)
        exact = [total * w / weight for w in weights]
        quotas = [int(q) for q in exact]
        by_remainder = sorted(range(len(names)), key=lambda i: (quotas[i] - exact[i], i))
        for i in by_remainder[:total - sum(quotas)]:
            quotas[i] += 1
        starved = [n for n, q in zip(names, quotas) if q == 0]
        if starved:
            raise ValueError(f"source(s) {starved}: weight too small for a single sample in an epoch of {total}")
        return cls(tuple(names), tuple(tuple(map(int, c)) for c in counts), tuple(quotas))

    @property
    def sizes(self) -> list[int]:
        return [sum(c) for c in self.counts]

    @property
    def total(self) -> int:
        return sum(self.quotas)

    def picks(self, seed: int, epoch: int) -> EpochPicks | None:
        """The source of each position of ``epoch``; None for one source."""
        if len(self.quotas) == 1:
            return None
        sources = np.repeat(np.arange(len(self.quotas), dtype=np.int16), self.quotas)
        return EpochPicks.of(epoch, sources[_rng(seed, epoch, 2).permutation(len(sources))], len(self.quotas))

    def digest(self) -> str:
        """The data's identity for resuming: per-shard sample counts in listed order (one source: as
        before sources existed), with a mix's names and quotas."""
        data = list(self.counts[0]) if len(self.counts) == 1 else [self.names, self.counts, self.quotas]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardOrder:
    """One source's own epoch: the shards in reading order and where each starts."""

    order: np.ndarray  # [shards] shard indices (in the source's listed order)
    offsets: np.ndarray  # [shards + 1] position in the source's epoch where each starts, then its size


@functools.lru_cache(maxsize=64)
def shard_order(counts: tuple[int, ...], seed: int, epoch: int, source: int, train: bool) -> ShardOrder:
    """The shards of source ``source`` (sample ``counts``) in its own ``epoch``: permuted (``train``)
    or listed."""
    counts_array = np.asarray(counts, dtype=np.int64)
    parts = (seed, epoch, 0) if source == 0 else (seed, epoch, 0, source)  # source 0: as before sources
    order = _rng(*parts).permutation(len(counts)) if train else np.arange(len(counts))
    return ShardOrder(order, np.concatenate([[0], np.cumsum(counts_array[order])]))


# ------------------------------------------------------------------------------------------ ranks


@dataclass(frozen=True)
class Remainder:
    """What is left of ``epoch`` after an elastic resume: sorted runs of its global positions."""

    epoch: int
    runs: np.ndarray  # [runs, 2] global [lo, hi)


@dataclass(frozen=True)
class RankPlan:
    """One rank's view of one epoch."""

    start: int  # global position of this rank's first sample
    real: int  # real samples of this rank (slots after them are padding)
    slots: int  # samples per rank, padding included: ceil(N / world_size)
    num_batches: int  # ceil(slots / batch_size), the same on every rank
    sequence: np.ndarray | None = None  # [runs, 2] global [lo, hi) the epoch is made of; None: all of it
    total: int = 0  # N: samples in the sequence

    def to_global(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Sequence positions ``[lo, hi)`` as ranges of global positions (of the epoch's N)."""
        if self.sequence is None:
            yield lo, hi
            return
        starts = _run_starts(self.sequence)
        i = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            take = min(hi, int(starts[i + 1])) - lo
            first = int(self.sequence[i, 0]) + lo - int(starts[i])
            yield first, first + take
            lo, i = lo + take, i + 1

    def worker_slots(self, batch_size: int, workers: int, worker: int) -> tuple[int, int]:
        """Rank slots ``[lo, hi)`` of logical ``worker``: its batches (``worker_split``), the last one
        cut at the rank's slots."""
        first, count = worker_split(self.num_batches, workers, worker)
        return first * batch_size, min((first + count) * batch_size, self.slots)


def _run_starts(sequence: np.ndarray) -> np.ndarray:
    """``[runs + 1]`` sequence position where each run of ``sequence [runs, 2]`` starts, then the length."""
    return np.concatenate([[0], np.cumsum(sequence[:, 1] - sequence[:, 0])])


def plan_epoch(size: int, rank: int, world_size: int, batch_size: int, sequence: np.ndarray | None = None
               ) -> RankPlan:
    """Rank ``rank``'s part of an epoch of ``size`` positions (or of ``sequence``, a part of them)."""
    total = size if sequence is None else int(_run_starts(sequence)[-1])
    start, end = rank * total // world_size, (rank + 1) * total // world_size
    slots = -(-total // world_size)
    return RankPlan(start, end - start, slots, -(-slots // batch_size), sequence, total)


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut and ordered (docs/streaming.md, 'Ranks', 'Workers', 'Shuffle and
    interleave'); a saved position continues batch for batch only under the same layout."""

    world_size: int
    workers: int  # logical workers: num_workers, or 1 when the main process reads (num_workers=0)
    batch_size: int
    shuffle_buffer: int
    interleave: int
    bucket_pool_batches: int = 0  # training only (0: off); a state saved before bucketing existed had none


# ------------------------------------------------------------------------------- workers, shuffle


def worker_split(num_batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """``(first batch, batch count)`` of logical ``worker``: contiguous, the first
    ``num_batches % num_workers`` workers one batch more (non-increasing counts)."""
    base, extra = divmod(num_batches, num_workers)
    return worker * base + min(worker, extra), base + (worker < extra)


def resume_position(num_batches: int, num_workers: int, delivered: int) -> tuple[int, list[int]]:
    """After ``delivered`` batches of the round-robin order: ``(logical worker whose turn is next,
    batches each logical worker has delivered)``."""
    base, extra = divmod(num_batches, num_workers)
    if delivered < base * num_workers:
        lap, turn = divmod(delivered, num_workers)
    else:
        lap, turn = base, delivered - base * num_workers
    return turn, [lap + (w < turn) for w in range(num_workers)]


def block_order(seed: int, epoch: int, rank: int, worker: int, block: int, size: int) -> np.ndarray:
    """The seeded permutation of shuffle block ``block`` (``size`` samples) of a worker."""
    return _rng(seed, epoch, 1, rank, worker, block).permutation(size)


def pool_batches(frames: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int, worker: int, pool: int
                 ) -> list[np.ndarray]:
    """Length bucketing (docs/streaming.md, 'Length bucketing'): the items of pool ``pool`` of a worker
    (``frames``: each one's valid frames, in delivery order) cut into batches of similar lengths,
    as indices into the pool in delivery order. The items sorted stably by frames are cut into batches
    of ``batch_size``; the full ones come in a seeded order, a short one (the rank's last) last."""
    ordered = np.argsort(frames, kind="stable")
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    full = len(ordered) // batch_size
    return [batches[i] for i in _rng(seed, epoch, 3, rank, worker, pool).permutation(full)] + batches[full:]


def cursor_count(interleave: int, total: int) -> int:
    """Cursors a worker reads its ``total`` slots with: ``interleave``, at most one per slot."""
    return max(1, min(interleave, total))


def _interleaved_offsets(items: np.ndarray, total: int, cursors: int) -> np.ndarray:
    """Slot offsets (from the worker's first slot) of interleaved items ``items`` (cursor ``i mod
    cursors`` while all are live, as ``ShardStream._interleaved`` reads them)."""
    base, extra = divmod(total, cursors)
    early = items < base * cursors
    cursor = np.where(early, items % cursors, items - base * cursors)
    depth = np.where(early, items // cursors, base)
    return cursor * base + np.minimum(cursor, extra) + depth


# ------------------------------------------------------------------------------------------ resume


FramesOf = Callable[[RankPlan, np.ndarray], np.ndarray]  # (a rank's plan, its slots) -> their frames (padding: 0)


def delivered_mask(positions: int, seed: int, epoch: int, train: bool, layout: Layout, delivered: int,
                   sequence: np.ndarray | None = None, frames_of: FramesOf | None = None) -> np.ndarray:
    """``[N]`` bool over the epoch's sequence (of ``positions``, or ``sequence``): the samples every
    rank of ``layout`` had handed out after ``delivered`` batches (the same arithmetic as
    ``ShardStream.worker_batches``; docs/streaming.md, 'Elastic resume'). With length bucketing, which
    samples the batches delivered from a worker's unfinished pool hold depends on their lengths:
    ``frames_of`` reads them; without it the pool's first items in plan order stand in for them
    (the same count of slots, the right samples only at pool boundaries: enough for progress counts)."""
    mask = None
    for rank in range(layout.world_size):
        plan = plan_epoch(positions, rank, layout.world_size, layout.batch_size, sequence)
        mask = np.zeros(plan.total, dtype=bool) if mask is None else mask
        _, done = resume_position(plan.num_batches, layout.workers, min(delivered, plan.num_batches))
        for worker in range(layout.workers):
            lo, hi = plan.worker_slots(layout.batch_size, layout.workers, worker)
            total = hi - lo
            taken = min(done[worker] * layout.batch_size, total)
            if taken <= 0:
                continue
            if not train:
                offsets = np.arange(taken)
            else:
                pooled, extra = layout.bucket_pool_batches * layout.batch_size, np.zeros(0, dtype=np.int64)
                if pooled and taken < total and frames_of is not None:
                    pool, batches = divmod(done[worker], layout.bucket_pool_batches)
                    items = np.arange(pool * pooled, min((pool + 1) * pooled, total))
                    frames = frames_of(plan, lo + _delivery_offsets(seed, epoch, rank, worker, total, layout, 0, items))
                    parts = pool_batches(frames, layout.batch_size, seed, epoch, rank, worker, pool)[:batches]
                    taken, extra = pool * pooled, items[np.concatenate([np.zeros(0, dtype=np.int64), *parts])]
                offsets = _delivery_offsets(seed, epoch, rank, worker, total, layout, taken, extra)
            slots = lo + offsets
            mask[plan.start + slots[slots < plan.real]] = True
    return mask


def _delivery_offsets(seed: int, epoch: int, rank: int, worker: int, total: int, layout: Layout,
                      prefix: int, more: np.ndarray) -> np.ndarray:
    """Slot offsets (from the worker's first slot) of a training worker's items: the first
    ``prefix`` of its delivery order (whole shuffle blocks and the seeded permutation prefix of the
    block it stops in), then those at delivery indices ``more``."""
    size = layout.shuffle_buffer
    block, drop = divmod(prefix, size)
    order = block_order(seed, epoch, rank, worker, block, min(size, total - block * size))
    items = [np.arange(block * size), block * size + order[:drop]]
    for b in np.unique(more // size).tolist():
        inside = more[more // size == b] - b * size
        items.append(b * size + block_order(seed, epoch, rank, worker, b, min(size, total - b * size))[inside])
    return _interleaved_offsets(np.concatenate(items), total, cursor_count(layout.interleave, total))


def undelivered(mask: np.ndarray, sequence: np.ndarray | None) -> np.ndarray:
    """Global positions of the sequence positions ``mask`` leaves out, in order."""
    left = np.flatnonzero(~mask)
    if sequence is not None and len(left):  # sequence positions -> global positions
        starts = _run_starts(sequence)
        run = np.searchsorted(starts, left, side="right") - 1
        left = sequence[run, 0] + left - starts[run]
    return left


def remaining_sequence(mask: np.ndarray, sequence: np.ndarray | None) -> np.ndarray:
    """``[runs, 2]`` global ``[lo, hi)`` ranges of the positions ``mask`` leaves out, in order."""
    left = undelivered(mask, sequence)
    breaks = np.flatnonzero(np.diff(left) != 1) + 1
    return np.array([[int(r[0]), int(r[-1]) + 1] for r in np.split(left, breaks) if len(r)],
                    dtype=np.int64).reshape(-1, 2)


def seen_per_source(mix: Mix, seed: int, epoch: int, train: bool, layout: Layout, delivered: int,
                    sequence: np.ndarray | None, picks: EpochPicks | None) -> list[int]:
    """Samples of each source handed out by all ranks of ``layout`` since the first epoch, when each
    has handed out ``delivered`` batches of ``epoch`` (``sequence``: what was left of it; ``picks``:
    its ``Mix.picks``): the earlier epochs' quotas and the epoch's positions delivered, padding not
    counted."""
    mask = delivered_mask(mix.total, seed, epoch, train, layout, delivered, sequence)
    left = undelivered(mask, sequence)
    left_per_source = [len(left)] if picks is None else np.bincount(picks.sources[left], minlength=len(mix.quotas))
    return [(epoch + 1) * quota - int(n) for quota, n in zip(mix.quotas, left_per_source)]
