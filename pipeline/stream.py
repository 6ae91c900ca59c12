"""Shard streaming for training and inference: the per-rank loader that reads what the epoch plan
(``pipeline.plan``) says, every sample once over ranks and workers. Here: the shard reader and its fault
policy (``ShardStream``), the ``DataLoader`` wrapper with exact and elastic resume (``StreamLoader``)
and source resolution across ranks (``make_loader``). docs/streaming.md describes the plan.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.collate import Collator, pad_sample
from pipeline.data_settings import DEFAULT_SOURCE, SOURCE_KEY, DataSettings, Source, source_prefixes
from pipeline.device import in_background, to_device_ahead
from shard_tools.fileio import file_sha256
from pipeline.overlap import overlaps
from pipeline.plan import (EpochPicks, Layout, Mix, RankPlan, Remainder, block_order, cursor_count, delivered_mask,
                           plan_epoch, pool_batches, remaining_sequence, resume_position, seen_per_source, shard_order,
                           worker_split)
from shard_tools.retry import RetryPolicy
from shard_tools.shard_format import decode_sample
from shard_tools.tar import ShardReadError, iter_samples
from shard_tools.urls import ResolveInfo, Shard, canonical_url, expand_urls, local_path, open_url, resolve_shards
from pipeline.workers import exit_flag, worker_init

STATE_VERSION = 3  # 3 added the sources (mixing); 2 the data digest and the epoch's sequence (elastic resume)
DATA_KEYS = ("seed", "num_samples", "train", "data_digest")  # must match to resume at all
LAYOUT_KEYS = tuple(f.name for f in dataclasses.fields(Layout))  # must match to resume exactly, else elastic


class StreamError(RuntimeError):
    """A shard fault in strict mode, too many skipped samples, or a state that does not fit."""


class StreamWarning(UserWarning):
    """A skipped shard or sample (URL, key and reason in the message)."""


# --------------------------------------------------------------------------------------- dataset


def _frames(sample: dict) -> int:
    """A decoded sample's valid frames, what bucketing sorts by (padding and skipped samples: 0)."""
    return 0 if sample.get("__pad__") else int(sample["mel"].shape[1])


class ShardStream(IterableDataset):
    """The per-rank iterable of collated batches for one epoch (docs/streaming.md). Iterated by a
    ``DataLoader(batch_size=None)``. Batches are in ``Collator.compact`` form (features cut after
    the longest clip, ``pad_values``) and carry ``"_skipped"`` (samples replaced by padding in them),
    which ``StreamLoader`` removes. ``set_position(epoch, batches)`` chooses where the next
    iteration starts, in every worker. ``shards`` are the sources' shards one source after the
    other, as ``mix.counts`` lists them; every sample handed to the collator names its source
    under ``SOURCE_KEY`` (padding for equal rank lengths: the first source)."""

    def __init__(self, shards: list[Shard], collator: Collator, settings: DataSettings, *, rank: int,
                 world_size: int, mix: Mix, n_mels: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank} of {world_size}")
        self.shards, self.collator = list(shards), collator
        self.counts = [s.samples for s in self.shards]
        self.mix = mix
        if [c for counts in mix.counts for c in counts] != self.counts:
            raise ValueError("the mix's shard counts are not those of the shards")
        self._first_shard = np.cumsum([0, *map(len, self.mix.counts)])[:-1]  # per source, in self.shards
        self._picks: EpochPicks | None = None  # of the epoch being read
        self.batch_size, self.train, self.seed = settings.batch_size, settings.train, settings.seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.interleave = settings.shuffle_buffer, settings.interleave
        self.bucket_pool_batches = settings.bucket_pool_batches  # evaluation too: its rows are keyed, not ordered
        self.on_error, self.verify, self.n_mels = settings.on_error, settings.verify, n_mels
        self.retry = settings.retry
        self._extra = 0  # samples found beyond a shard's index count since the last batch
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, batches delivered]
        self._verified: set[str] = set()
        self.sequence: Remainder | None = None  # the rest of an epoch after an elastic resume
        first = self.plan(0)  # a whole epoch's batch and sample counts per rank do not depend on the epoch
        self.num_samples, self.num_batches, self.rank_samples = self.mix.total, first.num_batches, first.real

    def plan(self, epoch: int) -> RankPlan:
        return plan_epoch(self.mix.total, self.rank, self.world_size, self.batch_size, self.sequence_of(epoch))

    def sequence_of(self, epoch: int) -> np.ndarray | None:
        """The part of ``epoch`` left to read after an elastic resume; None: all of it."""
        return self.sequence.runs if self.sequence and self.sequence.epoch == epoch else None

    def epoch_picks(self, epoch: int) -> EpochPicks | None:
        """``Mix.picks`` of ``epoch``, kept for the epoch being read; None: one source."""
        if len(self.mix.quotas) == 1:
            return None
        if self._picks is None or self._picks.epoch != epoch:
            self._picks = self.mix.picks(self.seed, epoch)
        return self._picks

    def seen(self, epoch: int, layout: Layout, delivered: int) -> list[int]:
        """Samples of each source handed out by all ranks of ``layout`` since the first epoch, when
        each has handed out ``delivered`` batches of ``epoch``: the earlier epochs' quotas and the
        epoch's positions delivered, padding not counted (``seen_per_source``)."""
        return seen_per_source(self.mix, self.seed, epoch, self.train, layout, delivered, self.sequence_of(epoch),
                               self.epoch_picks(epoch))

    def batches_in(self, epoch: int) -> int:
        """This rank's batches in ``epoch``: a whole epoch's, or fewer for the rest of an epoch
        re-planned by an elastic resume."""
        return self.plan(epoch).num_batches

    def set_position(self, epoch: int, batches: int) -> None:
        self._position[0], self._position[1] = epoch, batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        epoch, delivered = (int(v) for v in self._position.tolist())
        return self.worker_batches(epoch, delivered, workers, physical)

    def worker_batches(self, epoch: int, delivered: int, workers: int, physical: int) -> Iterator[dict]:
        """The batches physical worker ``physical`` of ``workers`` yields when the rank has already
        delivered ``delivered`` batches of ``epoch``."""
        plan = self.plan(epoch)
        if delivered >= plan.num_batches:
            return
        turn, done = resume_position(plan.num_batches, workers, delivered)
        logical = (turn + physical) % workers
        lo, hi = plan.worker_slots(self.batch_size, workers, logical)
        if self.bucket_pool_batches:
            yield from self._pooled(plan, epoch, logical, lo, hi, done[logical])
            return
        batch = []
        for sample in self._samples(self._ordered(plan, epoch, logical, lo, hi, lo + done[logical] * self.batch_size)):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch, epoch)
                batch = []
        if batch:
            yield self._collate(batch, epoch)

    def _pooled(self, plan: RankPlan, epoch: int, worker: int, lo: int, hi: int, done: int) -> Iterator[dict]:
        """Length bucketing (docs/streaming.md, 'Length bucketing'): the worker's delivery order in
        pools of ``bucket_pool_batches`` batches, each cut into batches by ``pool_batches``; after
        ``done`` batches, the current pool is read again from its start and its delivered batches
        dropped."""
        size = self.bucket_pool_batches * self.batch_size
        pool, drop = divmod(done, self.bucket_pool_batches)
        samples = self._samples(self._ordered(plan, epoch, worker, lo, hi, lo + pool * size))
        for first in range(pool * size, hi - lo, size):
            items = [next(samples) for _ in range(min(size, hi - lo - first))]
            frames = np.array([_frames(s) for s in items], dtype=np.int64)
            for batch in pool_batches(frames, self.batch_size, self.seed, epoch, self.rank, worker, pool)[drop:]:
                yield self._collate([items[i] for i in batch], epoch)
            pool, drop = pool + 1, 0

    def _samples(self, items: Iterator[dict]) -> Iterator[dict]:
        """Raw ``items`` decoded, each naming its source."""
        n_mels = self.n_mels
        for item in items:
            sample = self._decode(item, n_mels)
            sample[SOURCE_KEY] = item[SOURCE_KEY]
            if n_mels is None and "mel" in sample:  # no index: the first sample sets it for the rest
                n_mels = sample["mel"].shape[0]
            yield sample

    def slot_frames(self, epoch: int, plan: RankPlan, slots: np.ndarray) -> np.ndarray:
        """Valid frames of the samples at rank slots ``slots`` of ``plan`` (padding: 0), read from the
        shards (``plan.FramesOf``: what an elastic resume needs of a bucketing layout's unfinished pools)."""
        order = np.argsort(slots, kind="stable")
        wanted = slots[order][slots[order] < plan.real]
        frames, extra = [], self._extra  # samples beyond an index count are counted where batches are read
        for run in np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1) if len(wanted) else []:
            for first, end in plan.to_global(plan.start + int(run[0]), plan.start + int(run[-1]) + 1):
                frames += [_frames(s) for s in self._samples(self._read_range(epoch, first, end))]
        self._extra = extra
        out = np.zeros(len(slots), dtype=np.int64)
        out[order[:len(frames)]] = frames
        return out

    def _collate(self, samples: list[dict], epoch: int) -> dict:
        batch = self.collator.compact(samples, epoch)
        batch["_skipped"] = sum(s.get("__pad__") == "skip" for s in samples) + self._extra
        self._extra = 0
        return batch

    # -------------------------------------------------------------------------------- ordering

    def _ordered(self, plan: RankPlan, epoch: int, worker: int, lo: int, hi: int, start: int) -> Iterator[dict]:
        """Raw samples of rank slots ``[start, hi)`` in delivery order; blocks are aligned on ``lo``."""
        if not self.train:
            yield from self._slots(plan, epoch, start, hi)
            return
        size, total = self.shuffle_buffer, hi - lo
        block, drop = divmod(start - lo, size)
        stream = self._interleaved(plan, epoch, lo, total, block * size)
        for first in range(block * size, total, size):
            items = [next(stream) for _ in range(min(size, total - first))]
            order = block_order(self.seed, epoch, self.rank, worker, block, len(items))
            for j in order[drop:]:
                yield items[j]
                items[j] = None  # release the sample as soon as it is handed on
            drop, block = 0, block + 1

    def _interleaved(self, plan: RankPlan, epoch: int, lo: int, total: int, start: int) -> Iterator[dict]:
        """Items ``start ..`` of slots ``[lo, lo + total)`` read through ``interleave`` cursors on
        near-equal sub-ranges, round-robin (item i comes from cursor i mod K while all are live)."""
        cursors = cursor_count(self.interleave, total)
        turn, done = resume_position(total, cursors, start)
        readers = []
        for c in range(cursors):
            first, count = worker_split(total, cursors, c)
            readers.append(self._slots(plan, epoch, lo + first + done[c], lo + first + count))
        base = total // cursors
        for i in range(start, total):
            yield next(readers[i % cursors if i < base * cursors else i - base * cursors])

    def _slots(self, plan: RankPlan, epoch: int, lo: int, hi: int) -> Iterator[dict]:
        """Rank slots ``[lo, hi)`` in plan order: real samples, then this rank's padding."""
        real_hi = min(hi, plan.real)
        if lo < real_hi:
            for first, end in plan.to_global(plan.start + lo, plan.start + real_hi):
                yield from self._read_range(epoch, first, end)
        for _ in range(max(lo, plan.real), hi):
            yield pad_sample("rank") | {SOURCE_KEY: self.mix.names[0]}

    def _read_range(self, epoch: int, lo: int, hi: int) -> Iterator[dict]:
        """Global positions ``[lo, hi)`` of ``epoch``: each source's share of them read as one run of
        its own sequence, handed out in the order the epoch's picks give."""
        picks = self.epoch_picks(epoch)
        if picks is None:
            yield from self._read_source(0, epoch * self.mix.quotas[0] + lo, hi - lo)
            return
        window = picks.sources[lo:hi]
        before = picks.before(lo)
        taken = np.bincount(window, minlength=len(self.mix.quotas))
        readers = [self._read_source(s, epoch * quota + int(before[s]), int(taken[s]))
                   for s, quota in enumerate(self.mix.quotas)]
        for source in window.tolist():
            yield next(readers[source])
        for reader in readers:
            reader.close()  # each has handed out all it was asked for: its open shard is closed now

    def _read_source(self, source: int, lo: int, count: int) -> Iterator[dict]:
        """Samples ``[lo, lo + count)`` of ``source``'s own sequence (its epochs back to back), named
        with the source."""
        size, name, first_shard = self.mix.sizes[source], self.mix.names[source], int(self._first_shard[source])
        while count > 0:
            own_epoch, first = divmod(lo, size)
            take = min(count, size - first)
            shards = shard_order(self.mix.counts[source], self.seed, own_epoch, source, self.train)
            for item in self._read_shards(shards.order + first_shard, shards.offsets, first, first + take):
                item[SOURCE_KEY] = name
                yield item
            lo, count = lo + take, count - take

    def _read_shards(self, order: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> Iterator[dict]:
        """Positions ``[lo, hi)`` of shards ``order`` (indices into ``self.shards``) read one after
        another, ``offsets`` their starts: only the shards that overlap them, entered mid-shard."""
        i = int(np.searchsorted(offsets, lo, side="right")) - 1
        while lo < hi:
            shard = self.shards[order[i]]
            skip, count = lo - int(offsets[i]), min(hi, int(offsets[i + 1])) - lo
            if count > 0:  # empty shards are never opened
                yield from self._read_shard(shard, skip, count)
            lo, i = lo + count, i + 1

    def _read_shard(self, shard: Shard, skip: int, count: int) -> Iterator[dict]:
        """Exactly ``count`` items from ``shard`` after its first ``skip`` samples; samples lost to a
        fault are reported and replaced by skip-padding."""
        got, last_key = 0, None
        to_end = skip + count == shard.samples  # this read ends the shard: it checks nothing follows
        try:
            self._check_sha256(shard)
            with open_url(shard.url, self.retry) as stream:
                samples = iter_samples(stream, shard.url, skip=skip, limit=None if to_end else count)
                for raw in samples:
                    got, last_key = got + 1, raw["__key__"]
                    if got == count and to_end:  # before the last yield: a consumer may never come back
                        self._check_rest(shard, samples)
                    yield raw
                    if got == count:
                        break
            if got < count:
                raise ShardReadError(f"{shard.url}: shard ended after {skip + got} samples, "
                                     f"but its index entry says {shard.samples}")
        except (OSError, ValueError, EOFError) as error:  # ShardReadError and what a backend raises
            after = f" after key '{last_key}'" if last_key else f" at sample {skip}"
            where = "" if shard.url in str(error) else f"{shard.url}: "
            self._fault(f"{where}{error} ({count - got} planned sample(s) lost{after})")
            for _ in range(count - got):
                yield pad_sample("skip")

    def _check_rest(self, shard: Shard, samples: Iterator[dict]) -> None:
        """Samples left in a shard after the count its index entry gives are a fault, counted."""
        try:
            extra = sum(1 for _ in samples)
        except ShardReadError as error:
            self._fault(f"{error} (after the {shard.samples} samples its index entry lists)")
            return
        if extra:
            self._extra += extra
            self._fault(f"{shard.url}: holds {extra} sample(s) more than the {shard.samples} its index entry "
                        f"says; they are not read (pack the split again or fix its index.json)")

    def _check_sha256(self, shard: Shard) -> None:
        path = local_path(shard.url)
        if not (self.verify and shard.sha256 and path) or shard.url in self._verified:
            return
        actual = file_sha256(path)
        if actual != shard.sha256:
            raise ShardReadError(f"{shard.url}: sha256 {actual} does not match index.json ({shard.sha256})")
        self._verified.add(shard.url)

    def _decode(self, item: dict, n_mels: int | None) -> dict:
        if item.get("__pad__"):
            return item
        try:
            return decode_sample(item, n_mels)
        except Exception as error:  # whatever one sample's bytes make a decoder raise is that sample's fault
            message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            where = "" if item["__url__"] in message else f"{item['__url__']}: sample '{item['__key__']}': "
            self._fault(where + message)
            return pad_sample("skip")

    def _fault(self, message: str) -> None:
        if self.on_error == "raise":
            raise StreamError(message)
        warnings.warn(message, StreamWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------- loader


class _Crossing:
    """A compact batch on its way from a worker to the main process. A torch tensor crosses as
    shared memory whose file descriptor the main process fetches from the worker, a round trip per
    tensor that waits while the worker is busy collating; so only the features do (megabytes, which
    through the queue's pipe would be slower still), and the small tensors travel as numpy arrays
    pickled into the queue. The pin-memory thread (``pin_memory``) or the main process (``batch``)
    makes them tensors again."""

    def __init__(self, batch: dict):
        self.parts = {k: v.numpy() if isinstance(v, torch.Tensor) and k != "input_features" else v
                      for k, v in batch.items()}

    def batch(self) -> dict:
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in self.parts.items()}

    def pin_memory(self) -> dict:
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.batch().items()}


class StreamLoader:
    """Batches of one rank, epoch after epoch, with an exact resumable position (docs/streaming.md).

    Iterating yields the remaining batches of the current epoch (``infinite``: then the next epochs,
    forever); finishing an epoch moves to the next one, so iterating again or ``set_epoch(e + 1)``
    both continue. ``set_epoch(e)`` with the current epoch keeps the position (a resumed
    position survives the usual ``loader.set_epoch(epoch)`` at the top of a training loop)."""

    def __init__(self, dataset: ShardStream, settings: DataSettings, device=None):
        self.dataset, self.device = dataset, device
        num_workers = settings.num_workers
        self.num_workers, self.infinite = num_workers, settings.infinite
        self.max_skip_fraction = settings.max_skip_fraction
        self._loader_kwargs = dict(batch_size=None, num_workers=num_workers,
                                   # the compact batch, in the pin-memory thread when there are workers
                                   pin_memory=settings.pin_memory and torch.cuda.is_available(),
                                   collate_fn=_Crossing if num_workers > 0 else None,
                                   prefetch_factor=settings.prefetch_factor if num_workers > 0 else None,
                                   persistent_workers=settings.persistent_workers and num_workers > 0, in_order=True,
                                   # Worker seeds come from this generator, not torch's global RNG: the
                                   # stream draws no torch randomness, and a resumed training run's
                                   # dropout must not shift because a new iterator drew a seed.
                                   generator=torch.Generator().manual_seed(0),
                                   worker_init_fn=functools.partial(worker_init, exit_flag()) if num_workers else None)
        self._loader = DataLoader(dataset, **self._loader_kwargs)
        self.epoch, self.batches, self.skipped, self.epoch_skipped = 0, 0, 0, 0

    def __len__(self) -> int:
        return self.dataset.num_batches

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self.epoch_skipped = epoch, 0, 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.batches >= self.dataset.batches_in(self.epoch):
                self.set_epoch(self.epoch + 1)
            self.dataset.set_position(self.epoch, self.batches)
            arrived = (b.batch() if isinstance(b, _Crossing) else b for b in self._loader)
            if self.num_workers > 0:  # without workers the batches are made here: nothing to receive
                arrived = in_background(arrived)
            for batch in to_device_ahead(arrived, self.device):  # batches ahead are not delivered yet
                self._count_skips(batch.pop("_skipped"))
                self.batches += 1
                yield batch
            expected = self.dataset.batches_in(self.epoch)
            if self.batches != expected:
                raise StreamError(f"epoch {self.epoch} ended after {self.batches} of {expected} batches "
                                  f"on rank {self.dataset.rank}: the workers did not follow the plan")
            self.set_epoch(self.epoch + 1)
            if not self.infinite:
                return

    def _count_skips(self, count: int) -> None:
        self.skipped += count
        self.epoch_skipped += count
        limit = self.max_skip_fraction * self.dataset.rank_samples
        if self.epoch_skipped > limit:
            raise StreamError(f"{self.epoch_skipped} of {self.dataset.rank_samples} samples of rank "
                              f"{self.dataset.rank} were skipped in epoch {self.epoch}, more than "
                              f"max_skip_fraction={self.max_skip_fraction}; see the warnings above for URLs and keys")

    @property
    def layout(self) -> Layout:
        ds = self.dataset
        return Layout(ds.world_size, max(1, self.num_workers), ds.batch_size, ds.shuffle_buffer, ds.interleave,
                      ds.bucket_pool_batches)

    def progress(self) -> list[dict]:
        """Per source: ``name``, ``samples`` (its size), ``per_epoch`` (its positions in each epoch of
        the stream), ``seen`` (samples of it all ranks have handed out so far) and ``epochs`` (its own
        epochs that makes, ``seen / samples``). Arithmetic on the position (one pass over the epoch's
        positions), the same on every rank."""
        ds = self.dataset
        seen = ds.seen(self.epoch, self.layout, self.batches)
        return [{"name": name, "samples": size, "per_epoch": quota, "seen": n, "epochs": n / size}
                for name, size, quota, n in zip(ds.mix.names, ds.mix.sizes, ds.mix.quotas, seen)]

    def state_dict(self) -> dict:
        """JSON-able position: the same on every rank except the skip counts. Where every source
        stands follows from it (docs/streaming.md, 'Sources and mixing'); ``sources`` says so for people
        and the banner."""
        ds = self.dataset
        sequence = ds.sequence.runs.tolist() if ds.sequence and ds.sequence.epoch == self.epoch else None
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches, "seed": ds.seed,
                "num_samples": ds.num_samples, "train": ds.train, "data_digest": ds.mix.digest(),
                "num_workers": self.num_workers, **dataclasses.asdict(self.layout), "sequence": sequence,
                "skipped": self.skipped, "epoch_skipped": self.epoch_skipped, "sources": self.progress()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken: batch for batch under the same layout, elastically
        (docs/streaming.md, 'Elastic resume') under another. ``StreamError`` if the seed or the data
        differ. The rank is not checked: rank 0's state is valid on every rank (all ranks deliver the
        same batch counts)."""
        if state.get("version") not in range(1, STATE_VERSION + 1):
            raise StreamError(f"loader state version {state.get('version')!r}, this code reads 1 to {STATE_VERSION}")
        ds, before = self.dataset, self.dataset.sequence
        mine = {"seed": ds.seed, "num_samples": ds.num_samples, "train": ds.train, "data_digest": ds.mix.digest(),
                **dataclasses.asdict(self.layout)}
        saved = {"workers": max(1, int(state.get("num_workers", 0))), "data_digest": mine["data_digest"],
                 "bucket_pool_batches": 0, **state}  # version 1 states hold neither; older ones no bucketing
        wrong = [f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in DATA_KEYS if saved.get(k) != mine[k]]
        if wrong and "sources" in state:  # which sources, and their share of an epoch
            was = [(s["name"], s["samples"], s["per_epoch"]) for s in state["sources"]]
            now = list(zip(ds.mix.names, ds.mix.sizes, ds.mix.quotas))
            if was != now:
                wrong.append(f"sources (name, samples, per epoch): saved {was}, now {now}")
        if wrong:
            raise StreamError("cannot resume the data stream, its data or seed changed: " + "; ".join(wrong))
        epoch, batches = int(state["epoch"]), int(state["batches"])
        sequence = np.array(state["sequence"], dtype=np.int64).reshape(-1, 2) if state.get("sequence") else None
        old = Layout(**{k: int(saved[k]) for k in LAYOUT_KEYS})
        self.skipped, self.epoch_skipped = int(state.get("skipped", 0)), int(state.get("epoch_skipped", 0))
        if old != self.layout:
            if "data_digest" not in state:  # version 1 holds no digest to prove the shards are the same
                raise StreamError(f"a version-1 loader state resumes only under the layout it was saved with "
                                  f"({old}), not {self.layout}")
            delivered = delivered_mask(ds.num_samples, ds.seed, epoch, ds.train, old, batches, sequence,
                                       functools.partial(ds.slot_frames, epoch))
            sequence, batches = remaining_sequence(delivered, sequence), 0
            warnings.warn(f"the stream was saved under {old} and resumes under {self.layout}: the "
                          f"{int((~delivered).sum())} samples left in epoch {epoch} are re-planned over the new "
                          f"layout (each once); later epochs follow the new layout", StreamWarning)
            if not len(sequence):  # the epoch was complete
                epoch, sequence, self.epoch_skipped = epoch + 1, None, 0
        self.dataset.sequence = Remainder(epoch, sequence) if sequence is not None else None
        if self.dataset.sequence is not before and self._loader_kwargs["persistent_workers"]:
            self._loader = DataLoader(self.dataset, **self._loader_kwargs)  # running workers hold the old copy
        self.epoch, self.batches = epoch, batches


# ------------------------------------------------------------------------------------------ make


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        warnings.warn(f"WORLD_SIZE={env_world} but torch.distributed is not initialised yet: taking RANK and "
                      f"WORLD_SIZE from the environment (create the Accelerator before the loader)", StreamWarning)
        return int(os.environ.get("RANK", "0")), env_world
    return 0, 1


def _resolve_everywhere(urls, rank: int, world_size: int, policy: RetryPolicy | None
                        ) -> tuple[list[Shard], ResolveInfo]:
    """Shards and counts, resolved on rank 0 and broadcast when torch.distributed runs: a plan built
    from counts that differ between ranks (a shard one rank could not reach while counting) would
    break exactly-once and could hang DDP. Only rank 0 reads indexes or scans headers."""
    dist = torch.distributed
    shared = (world_size > 1 and dist.is_available() and dist.is_initialized()
              and dist.get_world_size() == world_size and dist.get_rank() == rank)
    if not shared:
        return resolve_shards(expand_urls(urls, policy), progress=rank == 0, policy=policy)
    box = [None]
    if rank == 0:
        try:
            box = [resolve_shards(expand_urls(urls, policy), policy=policy)]
        except Exception as error:  # sent on, so every rank raises it instead of waiting forever
            box = [error]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _resolve_sources(sources: list[Source], rank: int, world_size: int, policy: RetryPolicy | None
                     ) -> tuple[list[Shard], Mix, int | None]:
    """All sources' shards (one source after the other), their ``Mix`` and the mel bins they share."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise StreamError(f"source names must be unique, got {names}")
    shards, named, n_mels, first = [], [], {}, {}
    for source in sources:
        where = f"source '{source.name}': " if len(sources) > 1 else ""
        try:
            own, info = _resolve_everywhere(source.shards, rank, world_size, policy)
        except (OSError, ValueError) as error:  # a glob matching nothing, a missing shard, a broken index
            raise StreamError(f"{where}{error}") from error
        if sum(s.samples for s in own) == 0:
            raise StreamError(f"{where}no samples in {source.shards!r} ({len(own)} shard(s))")
        for shard in own:  # a shard listed twice, or a copy of it (its index sha256), is read twice per epoch
            for same, identity in (("file", canonical_url(shard.url)),
                                   ("sha256 in index.json", shard.sha256 if shard.samples else None)):
                seen = first.setdefault((same, identity), (source.name, shard.url))
                if identity and seen != (source.name, shard.url):
                    raise StreamError(f"shard {shard.url} of source '{source.name}' repeats {seen[1]} of source "
                                      f"'{seen[0]}' (same {same}): its samples would come twice per epoch "
                                      f"(list it once; a weight above 1 repeats a source)")
        if info.n_mels is not None:
            n_mels[source.name] = info.n_mels
        shards += own
        named.append((source.name, own))
    for found in overlaps(named) if rank == 0 else []:  # every rank holds the same shards
        warnings.warn(found.message(), StreamWarning, stacklevel=3)
    if len(set(n_mels.values())) > 1:
        raise StreamError(f"the sources' features differ in mel bins: {n_mels}")
    try:
        mix = Mix.weighted(names, [[s.samples for s in own] for _, own in named], [s.weight for s in sources])
    except ValueError as error:
        raise StreamError(str(error)) from None
    return shards, mix, next(iter(n_mels.values()), None)


def make_loader(urls, tokenizer, settings: DataSettings | None = None, *, rank: int | None = None,
                world_size: int | None = None, device=None, **changes) -> StreamLoader:
    """The per-rank loader for ``urls`` (see ``expand_urls``), or for a list of ``Source`` mixed by
    weight (docs/streaming.md, 'Sources and mixing'; their prefixes become ``settings.prefixes``), with
    ``settings``; keyword ``changes`` replace fields of ``settings`` (or of the defaults):
    ``make_loader(urls, tok, batch_size=8)``.
    Batches are ``Collator.compact`` ones, their tensors on ``device`` (``pipeline.device``; None:
    left on the host) for ``expand_features``.
    Rank and world size default to torch.distributed's. A URL that names nothing or a shard that
    cannot be counted is a ``StreamError`` naming it."""
    settings = dataclasses.replace(settings or DataSettings(), **changes)
    given = isinstance(urls, (list, tuple)) and bool(urls) and all(isinstance(u, Source) for u in urls)
    sources = list(urls) if given else [Source(DEFAULT_SOURCE, urls)]
    if given:
        settings = dataclasses.replace(settings, prefixes=source_prefixes(sources))
    rank, world_size = _rank_and_world(rank, world_size)
    shards, mix, n_mels = _resolve_sources(sources, rank, world_size, settings.retry)
    if settings.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers
    collator = Collator(tokenizer, settings, n_mels=n_mels or 80)
    dataset = ShardStream(shards, collator, settings, rank=rank, world_size=world_size, n_mels=n_mels, mix=mix)
    return StreamLoader(dataset, settings, device)
