"""The epoch plan's arithmetic on its own (pipeline/plan.py): no shards, no torch. Each guarantee is
checked against a plain simulation of what the loader does (round-robin workers, interleave cursors,
seeded shuffle blocks), written here independently of the plan's closed forms."""

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.plan import (STRIDE, Layout, Mix, delivered_mask, plan_epoch, pool_batches, remaining_sequence,
                           resume_position, seen_per_source, shard_order, undelivered, worker_split)


def round_robin(counts: list[int]) -> list[int]:
    """Whose each item is when workers with ``counts`` items take turns, dropping those that are done."""
    return [w for j in range(max(counts, default=0)) for w in range(len(counts)) if j < counts[w]]


def worker_order(seed: int, epoch: int, rank: int, worker: int, lo: int, hi: int, layout: Layout,
                 train: bool) -> list[int]:
    """Rank slots ``[lo, hi)`` in the order the worker hands them out: ``interleave`` near-equal
    sub-ranges read round-robin, then each shuffle block permuted by its seeded generator."""
    if not train:
        return list(range(lo, hi))
    parts = [list(p) for p in np.array_split(np.arange(lo, hi), max(1, min(layout.interleave, hi - lo)))]
    cursors = [iter(p) for p in parts]
    read = [next(cursors[c]) for c in round_robin([len(p) for p in parts])]
    out = []
    for block, first in enumerate(range(0, len(read), layout.shuffle_buffer)):
        items = read[first:first + layout.shuffle_buffer]
        out += [items[j] for j in np.random.default_rng([seed, epoch, 1, rank, worker, block]).permutation(len(items))]
    return out


def global_of(plan, slot: int) -> int:
    return next(first for first, _ in plan.to_global(plan.start + slot, plan.start + slot + 1))


def worker_batches(seed: int, epoch: int, rank: int, worker: int, plan, layout: Layout, train: bool,
                   frames: np.ndarray | None) -> list[list[int]]:
    """A worker's batches of rank slots: its delivery order cut into batches, or (length bucketing,
    ``frames`` of every global position) into pools of ``bucket_pool_batches`` batches, each sorted by
    frames (padding 0; ties in delivery order), cut, the full batches seeded-shuffled, a short one last."""
    lo, hi = plan.worker_slots(layout.batch_size, layout.workers, worker)
    slots, size = worker_order(seed, epoch, rank, worker, lo, hi, layout, train), layout.batch_size
    if not (train and layout.bucket_pool_batches):
        return [slots[i:i + size] for i in range(0, len(slots), size)]
    out, pooled = [], layout.bucket_pool_batches * size
    for pool, first in enumerate(range(0, len(slots), pooled)):
        items = slots[first:first + pooled]
        ordered = sorted(items, key=lambda s: (frames[global_of(plan, s)] if s < plan.real else 0, items.index(s)))
        cut = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        full = len(items) // size
        out += [cut[i] for i in np.random.default_rng([seed, epoch, 3, rank, worker, pool]).permutation(full)]
        out += cut[full:]
    return out


def handed_out(size: int, seed: int, epoch: int, train: bool, layout: Layout, delivered: int,
               sequence: np.ndarray | None = None, frames: np.ndarray | None = None) -> list[int]:
    """Global positions (of the epoch's sequence) every rank hands out in its first ``delivered``
    batches, simulated: per worker its batches in its order, the workers' batches round-robin."""
    out = []
    for rank in range(layout.world_size):
        plan = plan_epoch(size, rank, layout.world_size, layout.batch_size, sequence)
        per_worker = [worker_batches(seed, epoch, rank, w, plan, layout, train, frames) for w in range(layout.workers)]
        turns = iter(round_robin([len(b) for b in per_worker]))
        taken = collections.Counter(next(turns) for _ in range(min(delivered, plan.num_batches)))
        for worker, batches in enumerate(per_worker):
            out += [global_of(plan, s) for batch in batches[:taken[worker]] for s in batch if s < plan.real]
    return out


def frames_reader(frames: np.ndarray):
    """``plan.FramesOf`` over ``frames`` of every global position (padding slots: 0)."""
    return lambda plan, slots: np.array([frames[global_of(plan, s)] if s < plan.real else 0 for s in slots.tolist()],
                                        dtype=np.int64)


def sequence_positions(sequence: np.ndarray) -> list[int]:
    return [p for lo, hi in sequence.tolist() for p in range(lo, hi)]


@pytest.mark.parametrize("size", [1, 5, 23, 39, 100])
def test_every_position_once_over_ranks_and_workers_with_equal_batches(size):
    for world in range(1, 9):
        for workers in range(1, 5):
            for batch_size in (1, 3, 8):
                layout = Layout(world, workers, batch_size, shuffle_buffer=5, interleave=3)
                plans = [plan_epoch(size, rank, world, batch_size) for rank in range(world)]
                assert len({p.num_batches for p in plans}) == 1 and len({p.slots for p in plans}) == 1
                reals = [p.real for p in plans]
                assert sum(reals) == size and max(reals) - min(reals) <= 1
                assert 0 <= plans[0].slots * world - size < world  # padding: at most one slot per rank
                for train in (False, True):
                    got = handed_out(size, 7, 2, train, layout, plans[0].num_batches)
                    assert sorted(got) == list(range(size)), (world, workers, batch_size, train)


def test_worker_ranges_are_contiguous_and_cover_the_rank():
    for size in (0, 1, 7, 40):
        for world in (1, 3):
            for workers in (1, 2, 5):
                plan = plan_epoch(size, 0, world, 4)
                ranges = [plan.worker_slots(4, workers, w) for w in range(workers)]
                assert [s for lo, hi in ranges for s in range(lo, hi)] == list(range(plan.slots))
                assert all((hi - lo) % 4 == 0 for lo, hi in ranges if lo < hi < plan.slots)  # whole batches


def test_resume_position_matches_a_round_robin_simulation():
    for batches in range(0, 23):
        for workers in range(1, 6):
            counts = [worker_split(batches, workers, w)[1] for w in range(workers)]
            assert sum(counts) == batches and counts == sorted(counts, reverse=True)
            order = [w for j in range(max(counts)) for w in range(workers) if j < counts[w]]
            for delivered in range(batches):
                turn, done = resume_position(batches, workers, delivered)
                assert turn == order[delivered]
                assert done == [order[:delivered].count(w) for w in range(workers)]


@pytest.mark.parametrize("layout", [Layout(1, 1, 4, 500, 4), Layout(2, 3, 3, 5, 4), Layout(3, 2, 2, 4, 2),
                                    Layout(4, 1, 5, 7, 1), Layout(2, 2, 4, 3, 9)])
@pytest.mark.parametrize("train", [False, True])
def test_delivered_mask_is_what_the_workers_handed_out(layout, train):
    """After every batch count: the positions the simulated ranks and workers handed out, interleave
    cursors and the seeded permutation prefix of the block each stopped in included."""
    size = 39
    batches = plan_epoch(size, 0, layout.world_size, layout.batch_size).num_batches
    for delivered in range(batches + 1):
        mask = delivered_mask(size, 3, 1, train, layout, delivered)
        expected = handed_out(size, 3, 1, train, layout, delivered)
        assert len(expected) == len(set(expected)) and np.flatnonzero(mask).tolist() == sorted(expected), delivered


@pytest.mark.parametrize("old, new", [(Layout(2, 2, 3, 5, 4), Layout(3, 1, 2, 7, 4)),
                                      (Layout(3, 1, 2, 4, 2), Layout(1, 3, 5, 500, 4)),
                                      (Layout(1, 2, 4, 3, 1), Layout(2, 2, 4, 3, 3))])
def test_the_rest_of_an_epoch_replanned_under_another_layout_comes_once(old, new):
    """Elastic resume: what ``old`` had not handed out after k batches, as runs, cut over ``new``
    like a whole epoch: each remaining position once, equal batch counts, and twice composed."""
    size = 39
    full = plan_epoch(size, 0, old.world_size, old.batch_size).num_batches
    for k in sorted({0, 1, full // 2, full - 1, full}):
        mask = delivered_mask(size, 3, 0, True, old, k)
        rest = remaining_sequence(mask, None)
        assert sequence_positions(rest) == np.flatnonzero(~mask).tolist() == undelivered(mask, None).tolist()
        if not len(rest):
            continue
        plans = [plan_epoch(size, rank, new.world_size, new.batch_size, rest) for rank in range(new.world_size)]
        assert len({p.num_batches for p in plans}) == 1
        again = handed_out(size, 3, 0, True, new, plans[0].num_batches, rest)
        assert sorted(again) == sequence_positions(rest), k
        half = delivered_mask(size, 3, 0, True, new, plans[0].num_batches // 2, rest)  # and again, elsewhere
        later = remaining_sequence(half, rest)
        first_half = handed_out(size, 3, 0, True, new, plans[0].num_batches // 2, rest)
        assert sorted(first_half + sequence_positions(later)) == sequence_positions(rest), k


BUCKETED = [Layout(1, 1, 4, 500, 4, 2), Layout(2, 3, 3, 5, 4, 2), Layout(3, 2, 2, 4, 2, 3), Layout(2, 2, 4, 3, 9, 1),
            Layout(1, 2, 3, 7, 1, 50)]


def clip_frames(size: int, seed: int = 0) -> np.ndarray:
    """Frames of every position: 5-40, as ``write_mel_shards`` gives, with ties."""
    return np.random.default_rng(seed).integers(5, 41, size)


def test_pool_batches_sort_each_pool_by_frames_and_shuffle_the_full_batches_seeded():
    frames = clip_frames(23)
    batches = pool_batches(frames, 4, 3, 1, 0, 2, 5)
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    assert [len(b) for b in batches] == [4] * 5 + [3]  # the short batch last
    spans = sorted((frames[b].min(), frames[b].max()) for b in batches)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # length-sorted: no two batches overlap
    for b in batches:  # ties keep the delivery order
        assert all(i < j for i, j in zip(b, b[1:]) if frames[i] == frames[j])
    others = [pool_batches(frames, 4, *key) for key in [(4, 1, 0, 2, 5), (3, 2, 0, 2, 5), (3, 1, 1, 2, 5),
                                                        (3, 1, 0, 3, 5), (3, 1, 0, 2, 6)]]
    assert all([b.tolist() for b in o] != [b.tolist() for b in batches] for o in others)  # seeded by all of them
    assert [b.tolist() for b in pool_batches(frames, 4, 3, 1, 0, 2, 5)] == [b.tolist() for b in batches]


@pytest.mark.parametrize("layout", BUCKETED)
def test_bucketing_hands_out_every_position_once_with_equal_batches(layout):
    size = 39
    frames = clip_frames(size)
    plans = [plan_epoch(size, rank, layout.world_size, layout.batch_size) for rank in range(layout.world_size)]
    got = handed_out(size, 7, 2, True, layout, plans[0].num_batches, frames=frames)
    assert sorted(got) == list(range(size))
    sizes = [[len(b) for w in range(layout.workers) for b in worker_batches(7, 2, r, w, p, layout, True, frames)]
             for r, p in enumerate(plans)]
    assert len({tuple(s) for s in sizes}) == 1  # the same batch sizes, in the same order, on every rank


@pytest.mark.parametrize("layout", BUCKETED)
def test_delivered_mask_with_bucketing_is_what_the_workers_handed_out(layout):
    """After every batch count, pools part-delivered included: the positions the simulated workers
    handed out, the unfinished pools' batches read through ``frames_of``; without it the count stays
    (but for padding) and, at pool boundaries, the positions too."""
    size = 39
    frames = clip_frames(size, 1)
    batches = plan_epoch(size, 0, layout.world_size, layout.batch_size).num_batches
    for delivered in range(batches + 1):
        mask = delivered_mask(size, 3, 1, True, layout, delivered, frames_of=frames_reader(frames))
        expected = handed_out(size, 3, 1, True, layout, delivered, frames=frames)
        assert len(expected) == len(set(expected)) and np.flatnonzero(mask).tolist() == sorted(expected), delivered
        stand_in = delivered_mask(size, 3, 1, True, layout, delivered)  # progress counts: no read
        assert abs(stand_in.sum() - len(expected)) <= layout.world_size  # padding aside (a slot per rank)
        _, done = resume_position(batches, layout.workers, delivered)
        if all(d % layout.bucket_pool_batches == 0 for d in done):  # at pool boundaries: exact
            assert np.flatnonzero(stand_in).tolist() == sorted(expected), delivered


@pytest.mark.parametrize("old, new", [(Layout(2, 2, 3, 5, 4, 2), Layout(3, 1, 2, 7, 4, 3)),
                                      (Layout(3, 1, 2, 4, 2, 3), Layout(1, 3, 5, 500, 4, 0)),
                                      (Layout(1, 2, 4, 3, 1, 0), Layout(2, 2, 4, 3, 3, 2))])
def test_the_rest_of_a_bucketed_epoch_replanned_comes_once_and_bucketed(old, new):
    size = 39
    frames = clip_frames(size, 2)
    read = frames_reader(frames)
    full = plan_epoch(size, 0, old.world_size, old.batch_size).num_batches
    for k in sorted({1, full // 2, full - 1}):
        mask = delivered_mask(size, 3, 0, True, old, k, frames_of=read)
        assert sorted(handed_out(size, 3, 0, True, old, k, frames=frames)) == np.flatnonzero(mask).tolist()
        rest = remaining_sequence(mask, None)
        plans = [plan_epoch(size, rank, new.world_size, new.batch_size, rest) for rank in range(new.world_size)]
        assert len({p.num_batches for p in plans}) == 1
        again = handed_out(size, 3, 0, True, new, plans[0].num_batches, rest, frames)
        assert sorted(again) == sequence_positions(rest), k
        half = plans[0].num_batches // 2  # and again, from inside a pool of the re-planned rest
        later = remaining_sequence(delivered_mask(size, 3, 0, True, new, half, rest, read), rest)
        first_half = handed_out(size, 3, 0, True, new, half, rest, frames)
        assert sorted(first_half + sequence_positions(later)) == sequence_positions(rest), k


def test_undelivered_maps_sequence_positions_to_global_ones():
    sequence = np.array([[3, 6], [10, 11], [20, 24]], dtype=np.int64)
    mask = np.array([True, False, False, True, False, True, False, True])
    assert undelivered(mask, sequence).tolist() == [4, 5, 20, 22]
    assert remaining_sequence(mask, sequence).tolist() == [[4, 6], [20, 21], [22, 23]]
    plan = plan_epoch(0, 1, 2, 2, sequence)
    assert (plan.total, plan.start, plan.real) == (8, 4, 4)
    assert list(plan.to_global(2, 7)) == [(5, 6), (10, 11), (20, 23)]


def test_quotas_are_the_weights_share_by_largest_remainder():
    mix = Mix.weighted(["a", "b", "c"], [[10, 3], [7], [1]], [1, 1, 1])
    assert mix.quotas == (7, 7, 7) and mix.total == 21
    assert Mix.weighted(["a", "b"], [[5], [5]], [2, 1]).quotas == (7, 3)
    assert Mix.weighted(["a", "b", "c"], [[4], [3], [3]], [1, 1, 1]).quotas == (4, 3, 3)
    with pytest.raises(ValueError, match=r"\['b'\]: weight too small"):
        Mix.weighted(["a", "b"], [[50], [10]], [1000, 1])


def test_picks_give_each_source_its_quota_and_count_them_before_any_position():
    mix = Mix.weighted(["a", "b", "c"], [[3000, 2000], [3000], [2500]], [1, 2, 3])
    picks = mix.picks(seed=4, epoch=2)
    assert picks.epoch == 2 and np.bincount(picks.sources).tolist() == list(mix.quotas)
    for position in (0, 1, STRIDE - 1, STRIDE, STRIDE + 17, 2 * STRIDE, mix.total):
        assert picks.before(position).tolist() == np.bincount(picks.sources[:position], minlength=3).tolist()
    assert (mix.picks(4, 2).sources == picks.sources).all() and not (mix.picks(4, 3).sources == picks.sources).all()
    assert Mix.weighted(["a"], [[5, 2]], [1]).picks(4, 2) is None


def test_shard_order_is_seeded_per_source_epoch_and_listed_for_evaluation():
    counts = (4, 0, 7, 2, 5)
    train = shard_order(counts, 3, 1, 0, True)
    assert train.order.tolist() == np.random.default_rng([3, 1, 0]).permutation(5).tolist()  # as before sources
    other = shard_order(counts, 3, 1, 2, True).order
    assert other.tolist() == np.random.default_rng([3, 1, 0, 2]).permutation(5).tolist()
    assert train.offsets.tolist() == [0, *np.cumsum(np.array(counts)[train.order]).tolist()]
    listed = shard_order(counts, 3, 1, 0, False)
    assert listed.order.tolist() == [0, 1, 2, 3, 4] and listed.offsets.tolist() == [0, 4, 4, 11, 13, 18]


def test_seen_per_source_counts_earlier_epochs_and_the_delivered_part():
    mix = Mix.weighted(["a", "b"], [[5, 4], [7, 6, 2]], [2, 1])  # a: 16 of 24, b: 8
    layout = Layout(2, 2, 3, 5, 4)
    full = plan_epoch(mix.total, 0, 2, 3).num_batches
    picks = mix.picks(3, 1)
    assert seen_per_source(mix, 3, 1, True, layout, 0, None, picks) == [16, 8]
    assert seen_per_source(mix, 3, 1, True, layout, full, None, picks) == [32, 16]
    some = handed_out(mix.total, 3, 1, True, layout, 2)
    assert seen_per_source(mix, 3, 1, True, layout, 2, None, picks) == [
        quota + sum(int(picks.sources[p]) == s for p in some) for s, quota in enumerate(mix.quotas)]
    one = Mix.weighted(["a"], [[5, 4]], [1])
    assert seen_per_source(one, 3, 0, False, Layout(1, 1, 2, 5, 1), 2, None, None) == [4]


def test_the_plan_imports_numpy_alone():
    root = Path(__file__).resolve().parent.parent
    loaded = subprocess.check_output([sys.executable, "-c", "import sys, pipeline.plan; print(*sys.modules)"],
                                     text=True, cwd=root).split()
    assert "torch" not in loaded and [m for m in loaded if m.startswith("pipeline.")] == ["pipeline.plan"]
