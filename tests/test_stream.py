"""The stream's guarantees (issue 3), each checked against plain ``tarfile`` reads of the shards:
exactly once over ranks x workers, equal batch counts, seeded shuffling independent of the hash seed,
exact resume in a fresh process, infinite mode, faults, bounded memory, two ranks under accelerate."""

import collections
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.data_settings import SOURCE_KEY, Source
from shard_tools.fileio import write_json
from shard_tools.shard_format import Index
from pipeline.stream import StreamError, StreamWarning, make_loader
from shard_tools.writer import ShardWriter, index_entry
from tests._stream_run import fingerprint
from tests.conftest import mel_sample_bytes, write_mel_shards
from tests.test_writer import members

ROOT = Path(__file__).resolve().parents[1]


def tar_keys(paths) -> list[str]:
    """Sample keys in shard order, read with plain tarfile (the reference)."""
    keys = []
    for path in paths:
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    keys.append(name[:-len(".json")])
    return keys


def real_keys(batch) -> list[str]:
    return [k for k, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad]


def simulate(dataset, epoch: int, workers: int, delivered: int = 0) -> list[dict]:
    """What a DataLoader with ``workers`` workers yields: worker j-th batches round-robin by worker."""
    streams = [list(dataset.worker_batches(epoch, delivered, workers, p)) for p in range(workers)]
    return [s[j] for j in range(max(map(len, streams))) for s in streams if j < len(s)]


def loader(urls, processor, **kwargs):
    kwargs = {"batch_size": 2, "shuffle_buffer": 3, **kwargs}
    return make_loader(urls, processor.tokenizer, **kwargs)


@pytest.mark.parametrize("sizes", [[5], [3, 0, 7, 1, 12], [2, 9], [1, 1, 1]])
def test_exactly_once_over_all_ranks_and_workers(tmp_path, tiny_processor, sizes):
    paths = write_mel_shards(tmp_path / "train", sizes)
    expected = collections.Counter(tar_keys(paths))
    n = sum(sizes)
    for world in range(1, 9):
        for workers in range(1, 5):  # one logical worker is also what num_workers=0 runs
            per_rank = [simulate(loader(paths, tiny_processor, rank=r, world_size=world).dataset, 0, workers)
                        for r in range(world)]
            seen = collections.Counter(k for batches in per_rank for b in batches for k in real_keys(b))
            assert seen == expected, (world, workers)
            sizes_per_rank = {tuple(len(b["keys"]) for b in batches) for batches in per_rank}
            assert len(sizes_per_rank) == 1, (world, workers)  # same batch count and sizes on every rank
            pads = [b for batches in per_rank for b in batches]
            assert sum(int(b["is_pad"].sum()) for b in pads) == world * -(-n // world) - n
            for b in pads:
                rows = b["is_pad"]
                assert all(k == "" for k, p in zip(b["keys"], rows.tolist()) if p)
                assert (b["labels"][rows] == -100).all() and all(b["captions"][i] == [] for i in np.flatnonzero(rows))


@pytest.mark.parametrize("world,rank,workers", [(1, 0, 0), (1, 0, 3), (3, 1, 2), (2, 1, 4)])
def test_real_dataloader_workers_follow_the_plan(tmp_path, tiny_processor, world, rank, workers):
    paths = write_mel_shards(tmp_path / "train", [2, 9])  # fewer shards than ranks x workers
    real = loader(paths, tiny_processor, rank=rank, world_size=world, num_workers=workers)
    got = [b["keys"] for b in real]
    planned = [b["keys"] for b in simulate(real.dataset, 0, max(workers, 1))]
    assert got == planned and len(got) == len(real)


def test_interleave_mixes_shards_within_a_batch(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [24] * 4)

    def shards_per_batch(interleave):
        stream = loader(paths, tiny_processor, batch_size=8, shuffle_buffer=8, interleave=interleave)
        batches = [b["keys"] for b in stream]
        assert sorted(k for b in batches for k in b) == sorted(tar_keys(paths))
        return np.mean([len({k.split("_")[0] for k in keys}) for keys in batches])

    assert shards_per_batch(1) < 1.5 and shards_per_batch(4) == 4


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [6, 5, 7])
    first = loader(paths, tiny_processor, seed=1)
    epoch0 = [k for b in first for k in b["keys"]]
    epoch1 = [k for b in first for k in b["keys"]]  # iterating again gives the next epoch
    again = [k for b in loader(paths, tiny_processor, seed=1) for k in b["keys"]]
    other_seed = [k for b in loader(paths, tiny_processor, seed=2) for k in b["keys"]]
    assert epoch0 == again and sorted(epoch0) == sorted(epoch1) == sorted(tar_keys(paths))
    assert epoch0 != epoch1 and epoch0 != other_seed
    ordered = [k for b in loader(paths, tiny_processor, train=False) for k in b["keys"]]
    assert ordered == tar_keys(paths)  # evaluation keeps the listed order


def run_helper(args) -> dict:
    """tests/_stream_run.py in a fresh interpreter, with a hash seed other than this process's."""
    hashseed = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 1)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_stream_run.py"), *map(str, args)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": hashseed}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_process_continues_exactly(tmp_path, tiny_processor, workers):
    """Stop after k batches (mid-epoch, mid-shuffle-block), resume from the state_dict in a fresh
    process with another hash seed: the batches (keys, features, labels with the caption drawn from
    three) are those of the uninterrupted run, so the plan, the shuffle and the caption draw do not
    depend on PYTHONHASHSEED; and (0 workers, where decoding is counted in-process) nothing before the
    resume point is decoded again."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6], captions_per_clip=3)
    urls, state = str(tmp_path / "train"), tmp_path / "state.json"
    settings = {"batch_size": 4, "shuffle_buffer": 7, "seed": 3, "num_workers": workers, "infinite": True}
    endless = loader(urls, tiny_processor, **settings)
    full = [fingerprint(b) | {"epoch": endless.epoch} for _, b in zip(range(19), endless)]
    assert [b["epoch"] for b in full] == [0] * 8 + [1] * 8 + [2] * 3
    assert sorted(k for b in full[:8] for k in b["keys"]) == sorted(tar_keys(paths))
    k = 5
    head = loader(urls, tiny_processor, **settings)
    assert [fingerprint(b) | {"epoch": 0} for _, b in zip(range(k), head)] == full[:k]
    state.write_text(json.dumps(head.state_dict()))
    tail = run_helper([urls, "--workers", workers, "--batch-size", 4, "--shuffle-buffer", 7, "--take", len(full) - k,
                       "--state-in", state])
    assert tail["len"] == 8 and tail["batches"] == full[k:]
    if workers == 0:
        assert tail["decoded"] == sum(b["is_pad"].count(False) for b in tail["batches"])


LAYOUT = ("world_size", "num_workers", "batch_size", "shuffle_buffer", "interleave", "bucket_pool_batches")


def resumed_epoch(urls, processor, layout: tuple, state: dict | None, take: int | None = None):
    """Every rank of ``layout`` resumed from ``state`` (None: from the start): the real keys of the
    batches each hands out for the rest of its epoch (``take`` of them if given), the rank-0 state
    after those, and each rank's batch count."""
    keys, counts, after = [], [], None
    for rank in range(layout[0]):
        stream = loader(urls, processor, seed=3, rank=rank, **dict(zip(LAYOUT, layout)))
        if state is not None:
            stream.load_state_dict(state)
        batches = simulate(stream.dataset, stream.epoch, max(1, layout[1]), stream.batches)
        counts.append(len(batches))
        batches = batches[:take] if take is not None else batches
        keys += [k for b in batches for k in real_keys(b)]
        stream.batches += len(batches)
        after = after or stream.state_dict()
    return keys, counts, after


@pytest.mark.parametrize("old, new", [((2, 2, 3, 5, 4), (3, 0, 2, 7, 4)), ((3, 1, 2, 4, 2), (1, 3, 5, 500, 4)),
                                      ((1, 2, 4, 3, 1), (2, 2, 4, 3, 3)), ((2, 0, 3, 500, 4), (2, 2, 3, 500, 4))])
def test_elastic_resume_delivers_the_rest_of_the_epoch_once_under_any_layout(tmp_path, tiny_processor, old, new):
    """Saved under one (world size, workers, batch, shuffle buffer, interleave), resumed under another:
    the samples the old layout had not handed out come exactly once, with equal batch counts on the
    new ranks; a state saved at the end of an epoch starts the next one whole."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6, 0, 7])  # 39 samples
    urls, expected = str(tmp_path / "train"), collections.Counter(tar_keys(paths))
    _, (full, *_), _ = resumed_epoch(urls, tiny_processor, old, None)
    for k in sorted({0, 1, full // 2, full - 1, full}):
        seen, _, state = resumed_epoch(urls, tiny_processor, old, None, take=k)
        with pytest.warns(StreamWarning, match="re-planned over the new layout"):
            rest, counts, _ = resumed_epoch(urls, tiny_processor, new, state)
        assert len(set(counts)) == 1, (k, counts)
        if k == full:
            assert collections.Counter(rest) == expected and state["epoch"] == 0  # the next epoch, whole
        else:
            assert collections.Counter(seen + rest) == expected, k


def test_elastic_resume_composes_and_the_same_layout_continues_exactly(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6, 7])
    urls, expected = str(tmp_path / "train"), collections.Counter(tar_keys(paths))
    first, middle, last = (2, 2, 3, 5, 4), (3, 1, 2, 4, 2), (1, 2, 4, 3, 1)
    seen, _, state = resumed_epoch(urls, tiny_processor, first, None, take=2)
    with pytest.warns(StreamWarning):
        more, _, state = resumed_epoch(urls, tiny_processor, middle, state, take=1)
    assert state["sequence"] and state["batches"] == 1
    same, _, _ = resumed_epoch(urls, tiny_processor, middle, state)  # same layout: no re-plan, batch for batch
    with pytest.warns(StreamWarning):
        rest, _, _ = resumed_epoch(urls, tiny_processor, last, state)
    assert collections.Counter(seen + more + rest) == collections.Counter(seen + more + same) == expected


def test_an_elastic_resume_reaches_workers_that_are_already_running(tmp_path, tiny_processor):
    """Persistent workers copied the dataset when they started: a re-planned epoch loaded afterwards
    must reach them (not the stale whole epoch)."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6])
    saved = loader(paths, tiny_processor, seed=3)
    seen = [k for _, b in zip(range(4), saved) for k in real_keys(b)]
    running = loader(paths, tiny_processor, seed=3, num_workers=2, persistent_workers=True, batch_size=3)
    list(zip(range(2), running))  # its workers are up
    with pytest.warns(StreamWarning, match="re-planned"):
        running.load_state_dict(saved.state_dict())
    rest = [k for b in running for k in real_keys(b)]
    assert collections.Counter(seen + rest) == collections.Counter(tar_keys(paths))


def test_a_version_1_position_resumes_only_under_its_own_layout(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13])
    state = loader(paths, tiny_processor, seed=3).state_dict()
    v1 = {k: v for k, v in state.items() if k not in ("data_digest", "sequence", "workers")} | {"version": 1}
    loader(paths, tiny_processor, seed=3).load_state_dict(v1)  # same layout: fine
    with pytest.raises(StreamError, match="version-1 loader state resumes only under the layout"):
        loader(paths, tiny_processor, seed=3, batch_size=3).load_state_dict(v1)


def test_a_position_does_not_resume_on_other_data_or_another_seed(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13])
    state = loader(paths, tiny_processor, seed=3).state_dict()
    with pytest.raises(StreamError, match="seed: saved 3, now 4"):
        loader(paths, tiny_processor, seed=4).load_state_dict(state)
    with pytest.raises(StreamError, match="num_samples: saved 26, now 22"):
        loader(write_mel_shards(tmp_path / "other", [9, 4, 9]), tiny_processor, seed=3).load_state_dict(state)
    with pytest.raises(StreamError, match="data_digest"):
        loader(paths[::-1], tiny_processor, seed=3).load_state_dict(state)


def test_persistent_workers_follow_set_epoch_and_load_state_dict(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6])
    reference = loader(paths, tiny_processor, infinite=True, num_workers=2)
    expected = [b["keys"] for _, b in zip(range(2 * len(reference)), reference)]
    persistent = loader(paths, tiny_processor, num_workers=2, persistent_workers=True)
    stopped = [b["keys"] for _, b in zip(range(3), persistent)]  # break after 3 batches
    assert stopped == expected[:3]
    persistent.load_state_dict({**persistent.state_dict(), "epoch": 0, "batches": 5})
    persistent.set_epoch(0)  # the usual call at the top of an epoch keeps a resumed position
    rest = [b["keys"] for b in persistent]
    persistent.set_epoch(1)
    rest += [b["keys"] for b in persistent]
    assert rest == expected[5:]


def test_infinite_mode_runs_seeded_epochs_back_to_back(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [5, 6])
    finite = loader(paths, tiny_processor)
    epochs = []
    for epoch in range(3):
        finite.set_epoch(epoch)
        epochs.append([b["keys"] for b in finite])
    endless = loader(paths, tiny_processor, infinite=True)
    n = len(endless)
    got = [b["keys"] for _, b in zip(range(2 * n + 2), endless)]
    assert got == epochs[0] + epochs[1] + epochs[2][:2]
    assert endless.state_dict()["epoch"] == 2 and endless.state_dict()["batches"] == 2


def collect(stream_loader) -> tuple[list[str], list[str], list[int]]:
    """(real keys, warning messages, batch sizes) of one epoch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(stream_loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, StreamWarning)]
    return [k for b in batches for k in real_keys(b)], messages, [len(b["keys"]) for b in batches]


def readable_keys(path) -> list[str]:
    """Keys whose two members plain tarfile can still read from a damaged shard."""
    members = collections.defaultdict(set)
    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                tar.extractfile(info).read()
                key, ext = info.name.split(".", 1)
                members[key].add(ext)
    except tarfile.TarError:
        pass
    return [k for k, exts in members.items() if exts == {"mel.npy", "json"}]


def test_truncated_tar_is_reported_skipped_and_counted(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [6, 6, 6])
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[:len(data) * 6 // 10 + 100])  # mid-block: inside a member
    good = tar_keys([paths[0], paths[2]]) + readable_keys(paths[1])
    keys, messages, sizes = [], [], []
    for rank in range(2):
        stream = loader(paths, tiny_processor, rank=rank, world_size=2, max_skip_fraction=0.5)
        k, m, s = collect(stream)
        keys, messages, sizes = keys + k, messages + m, sizes + [s]
        assert stream.skipped == stream.state_dict()["skipped"]
    assert sorted(keys) == sorted(good) and len(good) < 18
    assert sizes[0] == sizes[1]
    assert any("001.tar: truncated tar" in m for m in messages), messages
    with pytest.raises(StreamError, match="001.tar"):
        list(loader(paths, tiny_processor, on_error="raise"))
    with pytest.raises(StreamError, match="max_skip_fraction"), pytest.warns(StreamWarning):
        list(loader(paths, tiny_processor, max_skip_fraction=0.05))


class _Boom:
    """Unpickling this touches a marker file: proof that shard content was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_corrupt_members_are_skipped_without_unpickling(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [4, 5])
    marker = tmp_path / "unpickled"
    pickled = io.BytesIO()
    np.save(pickled, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    members = []
    for i in range(5):
        key = f"s001_{i:04d}"
        sample = mel_sample_bytes(key, 10, [f"caption {key}"], seed=i)
        if i == 1:
            sample[f"{key}.mel.npy"] = pickled.getvalue()
        if i == 2:
            sample[f"{key}.json"] = b"{not json"
        if i == 3:
            del sample[f"{key}.mel.npy"]
        members += sample.items()
    with tarfile.open(paths[1], "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = loader(paths, tiny_processor, max_skip_fraction=0.5)
    keys, messages, _ = collect(stream)
    assert sorted(keys) == sorted(tar_keys([paths[0]]) + ["s001_0000", "s001_0004"])
    assert stream.skipped == 3 and not marker.exists()
    for key in ("s001_0001", "s001_0002", "s001_0003"):
        assert any(key in m and "001.tar" in m for m in messages), key
    with pytest.raises(StreamError, match="s001_000[123]"):
        list(loader(paths, tiny_processor, on_error="raise"))


def test_missing_shard_and_sha256_mismatch_are_skipped(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [5, 5, 5])
    os.remove(paths[2])
    stream = loader(str(tmp_path / "train"), tiny_processor, max_skip_fraction=0.4, num_workers=2)
    keys, _, sizes = collect(stream)  # worker warnings go to the workers' stderr
    assert sorted(keys) == sorted(tar_keys(paths[:2])) and stream.skipped == 5 and len(sizes) == len(stream)
    with pytest.raises(StreamError, match="002.tar"):
        list(loader(paths, tiny_processor, on_error="raise"))
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data.replace(b"caption s000_0001 0", b"caption s000_0001 X"))
    keys, messages, _ = collect(loader(paths[:2], tiny_processor, verify=True, max_skip_fraction=0.6))
    assert sorted(keys) == sorted(tar_keys(paths[1:2])) and any("sha256" in m for m in messages)
    keys, _, _ = collect(loader(paths[:2], tiny_processor, max_skip_fraction=0.6))
    assert sorted(keys) == sorted(tar_keys(paths[:2]))  # without verify the edited shard still reads


def test_memory_does_not_grow_with_the_split(tmp_path):
    """Resident memory of a fresh process (torch's tensors included) over 15 vs 90 batches of
    1.9 MB each once padded: flat, and no yielded batch is kept alive by the loader."""
    def run(shards: int) -> dict:
        write_mel_shards(tmp_path / f"n{shards}", [30] * shards)
        cmd = [sys.executable, str(ROOT / "tests" / "_stream_run.py"), str(tmp_path / f"n{shards}"),
               "--take", str(30 * shards // 4), "--shuffle-buffer", "16"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    small, large = run(2), run(12)  # 60 vs 360 samples
    assert small["alive"] == large["alive"] == 0
    # measured: +0.1 MB and +16 MB (the allocator keeps some freed batches); kept alive, 90 batches are 170 MB
    assert large["rss_growth"] < small["rss_growth"] + 32e6, (small["rss_growth"], large["rss_growth"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_under_accelerate_launch(tmp_path):
    paths = write_mel_shards(tmp_path / "train", [5, 2, 4])  # 11 samples: one rank gets a padding sample
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "_stream_accel.py"), str(tmp_path / "train"), str(out), "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["sizes"] == ranks[1]["sizes"] and len(ranks[0]["sizes"]) == ranks[0]["len"]
    assert ranks[0]["gathered_batches"] == [ranks[0]["len"]] * 2
    assert collections.Counter(ranks[0]["keys"] + ranks[1]["keys"]) == collections.Counter(tar_keys(paths))


# ---------------------------------------------------------------------------- hostile shards

def write_members(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_hostile_samples_cost_only_themselves(tmp_path, tiny_processor):
    good = {}
    for i in range(4):
        good.update(mel_sample_bytes(f"good{i}", 8, [f"caption {i}"], seed=i))
    meta = json.loads(good["good0.json"])
    hostile = {  # key -> (mel.npy, json): each raised or went to inf before
        "surrogate": (good["good0.mel.npy"], json.dumps({**meta, "captions": ["bad \ud800"]}).encode()),
        "deep": (good["good0.mel.npy"], b'{"captions": ["x"], "pad_value": 0, "extra": ' + b"[" * 50000
                 + b"]" * 50000 + b"}"),
        "float32": (npy(np.full((80, 8), 1e5, np.float32)), good["good0.json"]),
        "float64": (npy(np.full((80, 8), 1e300, np.float64)), good["good0.json"]),
        "padvalue": (good["good0.mel.npy"], json.dumps({**meta, "pad_value": 1e6}).encode()),
        "notutf8": (good["good0.mel.npy"], b'{"captions": ["\xff"], "pad_value": 0}'),
    }
    members = dict(list(good.items())[:4])
    for key, (mel, meta_bytes) in hostile.items():
        members.update({f"{key}.mel.npy": mel, f"{key}.json": meta_bytes})
    members.update(dict(list(good.items())[4:]))
    (tmp_path / "train").mkdir()
    write_members(tmp_path / "train" / "000.tar", members)
    keys, messages, _ = collect(loader(str(tmp_path / "train" / "000.tar"), tiny_processor, max_skip_fraction=0.6))
    assert sorted(keys) == [f"good{i}" for i in range(4)]
    for key, reason in [("surrogate", "lone surrogate"), ("deep", "nests deeper"), ("float32", "NaN or inf"),
                        ("float64", "NaN or inf"), ("padvalue", "float16 range"), ("notutf8", "invalid json")]:
        assert any(f"'{key}'" in m and reason in m for m in messages), (key, messages)
    batch = next(iter(loader(str(tmp_path / "train" / "000.tar"), tiny_processor, max_skip_fraction=0.6,
                             batch_size=10)))
    assert np.isfinite(batch["input_features"].numpy()).all()
    with pytest.raises(StreamError, match="surrogate"):
        list(loader(str(tmp_path / "train" / "000.tar"), tiny_processor, on_error="raise", train=False))


def test_index_counts_are_checked_where_shards_are_read(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [4, 6])
    index_path = tmp_path / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][1]["samples"] = 3  # under-counts: 3 samples would be lost unseen
    index_path.write_text(json.dumps(index))
    stream = loader(str(tmp_path / "train"), tiny_processor, max_skip_fraction=0.5, train=False)
    keys, messages, _ = collect(stream)
    assert keys == tar_keys(paths)[:7] and stream.skipped == 3
    assert any("001.tar: holds 3 sample(s) more than the 3" in m for m in messages), messages
    with pytest.raises(StreamError, match="max_skip_fraction"):
        list(loader(str(tmp_path / "train"), tiny_processor, max_skip_fraction=0.1))
    with pytest.raises(StreamError, match="holds 3 sample"):
        list(loader(str(tmp_path / "train"), tiny_processor, on_error="raise"))
    index["shards"][1]["samples"] = 10**9  # would plan a billion reads of nothing
    index_path.write_text(json.dumps(index))
    with pytest.raises(StreamError, match="claims 1000000000 samples"):
        loader(str(tmp_path / "train"), tiny_processor)


def test_missing_shards_and_empty_globs_raise_in_one_line(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [2, 2, 2], index=False)
    os.remove(paths[1])
    with pytest.raises(StreamError, match="001.tar: cannot open") as caught:
        loader(f"{tmp_path}/train/{{000..002}}.tar", tiny_processor)
    assert "\n" not in str(caught.value)
    with pytest.raises(StreamError, match="no file matches"):
        loader(f"{tmp_path}/nothing/*.tar", tiny_processor)


def test_one_shard_under_two_spellings_is_refused(tmp_path, tiny_processor):
    write_mel_shards(tmp_path / "train", [2, 3])
    d = tmp_path / "train"
    for spec in ([f"{d}/000.tar", f"{d}/./000.tar"], [f"{d}/000.tar", f"{d}//000.tar"],
                 [str(d), f"{d}/index.json"], [f"{d}/001.tar", str(d)]):
        with pytest.raises(StreamError, match="more than once"):
            loader(spec, tiny_processor)


# ------------------------------------------------------------------------------------- mixed sources


def mixed(tmp_path, sizes: dict[str, list[int]], weights: dict[str, float]) -> tuple[list[Source], dict]:
    """Sources named by ``sizes`` (keys ``{name}{shard}_{i}``) with ``weights``, and each one's keys
    read with plain tarfile."""
    sources, keys = [], {}
    for name, shard_sizes in sizes.items():
        paths = write_mel_shards(tmp_path / name, shard_sizes, prefix=name)
        sources.append(Source(name, str(tmp_path / name), weights[name]))
        keys[name] = tar_keys(paths)
    return sources, keys


def source_of(key: str) -> str:
    return key.rstrip("0123456789_")


def record_sources(dataset) -> list[tuple[str, str]]:
    """(key, SOURCE_KEY) of every sample the dataset hands its collator, appended as they go."""
    seen, compact = [], dataset.collator.compact

    def recording(samples, epoch=0):
        seen.extend((s["__key__"], s[SOURCE_KEY]) for s in samples)
        return compact(samples, epoch)

    dataset.collator.compact = recording
    return seen


def test_each_source_comes_once_per_its_own_epoch_over_all_ranks_and_workers(tmp_path, tiny_processor):
    """Sizes 4, 8, 12 at equal weights: each has 8 of an epoch's 24 positions, so one stream epoch
    is two epochs of a, one of b and two thirds of c, and three stream epochs are 6, 3 and 2 whole
    epochs; every rank has as many batches as the others, and each sample names its source."""
    sources, keys = mixed(tmp_path, {"a": [3, 1], "b": [5, 0, 3], "c": [7, 5]}, {"a": 1, "b": 1, "c": 1})
    for world, workers in [(1, 1), (2, 3), (3, 2)]:
        per_epoch = []
        for epoch in range(3):
            ranks = [loader(sources, tiny_processor, rank=r, world_size=world, batch_size=3).dataset
                     for r in range(world)]
            tags = [record_sources(ds) for ds in ranks]
            batches = [simulate(ds, epoch, workers) for ds in ranks]
            assert len({tuple(len(b["keys"]) for b in rank) for rank in batches}) == 1, (world, workers)
            per_epoch.append(collections.Counter(k for rank in batches for b in rank for k in real_keys(b)))
            assert sum(map(len, tags)) == sum(len(b["keys"]) for rank in batches for b in rank)
            assert all(tag == (source_of(key) if key else "a") for rank in tags for key, tag in rank)
        first = per_epoch[0]
        assert [first[k] for k in keys["a"] + keys["b"]] == [2] * 4 + [1] * 8, (world, workers)
        assert sorted(first[k] for k in keys["c"]) == [0] * 4 + [1] * 8, (world, workers)  # 8 of its 12, once
        whole = collections.Counter(keys["a"] * 6 + keys["b"] * 3 + keys["c"] * 2)  # own epochs, each whole
        assert sum(per_epoch, collections.Counter()) == whole


def test_sources_come_in_proportion_to_their_weights_within_binomial_noise(tmp_path, tiny_processor):
    sources, _ = mixed(tmp_path, {"big": [40, 40], "small": [20, 20]}, {"big": 1, "small": 3})
    stream = loader(sources, tiny_processor, batch_size=10, shuffle_buffer=20, seed=5)
    assert stream.dataset.mix.quotas == (30, 90)
    batches = [[source_of(k) for k in b["keys"]] for b in stream]
    share = [b.count("small") / len(b) for b in batches]
    assert np.mean(share) == 0.75  # exact over an epoch
    sigma = np.sqrt(0.75 * 0.25 / 10)  # of one batch's share, were sources drawn independently
    assert all(abs(s - 0.75) <= 4 * sigma for s in share) and np.std(share) <= 1.5 * sigma
    other = [[source_of(k) for k in b["keys"]] for b in loader(sources, tiny_processor, batch_size=10, seed=6)]
    assert other != batches  # seeded


def shard_runs(keys: list[str]) -> list[str]:
    """The shards ``keys`` come from (``{prefix}{shard}_{i}``), each run of one shard once."""
    shards = [k.split("_")[0] for k in keys]
    return [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]


def test_each_epoch_visits_the_shards_and_interleaves_the_sources_in_its_own_order(tmp_path, tiny_processor):
    """Read straight through (shuffle blocks of one sample, one cursor), an epoch's key order is its
    plan: the shards each source visits, and which source each position is. Both are drawn per
    epoch (docs/streaming.md, 'Sources and mixing'): every epoch differs, for the first source and the others."""
    sources, _ = mixed(tmp_path, {"a": [2] * 6, "b": [2] * 6}, {"a": 1, "b": 1})
    straight = {"shuffle_buffer": 1, "interleave": 1, "seed": 4}
    one = loader(sources[0].shards, tiny_processor, **straight)
    mix = loader(sources, tiny_processor, **straight)
    epochs = [[k for b in one for k in b["keys"]] for _ in range(4)]
    mixed_epochs = [[k for b in mix for k in b["keys"]] for _ in range(4)]
    visits = [shard_runs(keys) for keys in epochs]
    assert all(sorted(v) == [f"a{s:03d}" for s in range(6)] for v in visits)
    assert len({tuple(v) for v in visits}) == 4
    for name in "ab":  # equal sizes and weights: each stream epoch is one own epoch of each source
        own = [shard_runs([k for k in keys if source_of(k) == name]) for keys in mixed_epochs]
        assert all(sorted(v) == [f"{name}{s:03d}" for s in range(6)] for v in own)
        assert len({tuple(v) for v in own}) == 4, name
    whose = [tuple(source_of(k) for k in keys) for keys in mixed_epochs]
    assert all(w.count("a") == 12 for w in whose) and len(set(whose)) == 4


def test_a_mix_resumes_in_a_fresh_process_exactly(tmp_path, tiny_processor):
    """Stopped mid-epoch (and mid own epoch of every source), resumed from the state in a fresh process
    with workers: the batches of the uninterrupted run, across the next stream epoch too."""
    sources, _ = mixed(tmp_path, {"a": [5, 4], "b": [7, 6, 2]}, {"a": 2, "b": 1})
    settings = {"batch_size": 4, "shuffle_buffer": 7, "seed": 3, "num_workers": 2, "infinite": True}
    endless = loader(sources, tiny_processor, **settings)
    full = [fingerprint(b) | {"epoch": endless.epoch} for _, b in zip(range(11), endless)]
    k, state = 3, tmp_path / "state.json"
    head = loader(sources, tiny_processor, **settings)
    assert [fingerprint(b) | {"epoch": 0} for _, b in zip(range(k), head)] == full[:k]
    state.write_text(json.dumps(head.state_dict()))
    tail = run_helper(["-", "--workers", 2, "--batch-size", 4, "--shuffle-buffer", 7, "--take", len(full) - k,
                       "--state-in", state, "--sources", json.dumps([dataclasses.asdict(s) for s in sources])])
    assert tail["batches"] == full[k:]
    assert [s["seen"] for s in tail["state"]["sources"]] == [sum(source_of(key) == name for b in full for key, pad
                                                                 in zip(b["keys"], b["is_pad"]) if not pad)
                                                             for name in ("a", "b")]


def test_a_mix_resumes_elastically_and_counts_what_each_source_gave(tmp_path, tiny_processor):
    sources, keys = mixed(tmp_path, {"a": [5, 4], "b": [7, 6, 2]}, {"a": 2, "b": 1})  # a: 16 of 24, b: 8
    old, new = (2, 2, 3, 5, 4), (3, 1, 2, 7, 2)
    seen, _, state = resumed_epoch(sources, tiny_processor, old, None, take=2)
    assert [s["seen"] for s in state["sources"]] == [sum(source_of(k) == n for k in seen) for n in "ab"]
    with pytest.warns(StreamWarning, match="re-planned"):
        rest, counts, after = resumed_epoch(sources, tiny_processor, new, state)
    assert len(set(counts)) == 1
    got = collections.Counter(seen + rest)
    # a's own epoch 0 whole and 7 of its own epoch 1; b: 8 of its first epoch
    assert sorted(got[k] for k in keys["a"]) == [1] * 2 + [2] * 7
    assert sorted(got[k] for k in keys["b"]) == [0] * 7 + [1] * 8
    assert [(s["seen"], s["epochs"]) for s in after["sources"]] == [(16, 16 / 9), (8, 8 / 15)]


def test_a_mix_does_not_resume_with_other_weights_and_names_are_checked(tmp_path, tiny_processor):
    sources, _ = mixed(tmp_path, {"a": [5, 4], "b": [7]}, {"a": 2, "b": 1})
    state = loader(sources, tiny_processor).state_dict()
    with pytest.raises(StreamError, match=r"sources \(name, samples, per epoch\): saved \[\('a', 9, 11\), "
                                          r"\('b', 7, 5\)\], now \[\('a', 9, 8\), \('b', 7, 8\)\]"):
        loader([dataclasses.replace(s, weight=1) for s in sources], tiny_processor).load_state_dict(state)
    with pytest.raises(StreamError, match="source names must be unique"):
        loader([sources[0], dataclasses.replace(sources[1], name="a")], tiny_processor)
    with pytest.raises(StreamError, match=r"a/000.tar of source 'b' repeats .*a/000.tar of source 'a' \(same file\)"):
        loader([sources[0], Source("b", f"{tmp_path}/a/000.tar")], tiny_processor)
    with pytest.raises(StreamError, match="source 'c': .*no file matches"):
        loader([*sources, Source("c", f"{tmp_path}/none/*.tar")], tiny_processor)


def test_a_copied_shard_in_another_source_or_the_same_one_is_refused(tmp_path, tiny_processor):
    """A copied folder holds the same samples: mixed with its original (or listed beside it) every
    sample would be trained twice per epoch. index.json's sha256 says so before anything is read;
    empty shards (identical bytes, no samples) are no overlap."""
    write_mel_shards(tmp_path / "a", [3, 0], prefix="a")
    write_mel_shards(tmp_path / "b", [2, 0], prefix="b")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    sources = [Source(name, str(tmp_path / folder)) for name, folder in (("a", "a"), ("b", "b"), ("c", "copy"))]
    with pytest.raises(StreamError, match=r"copy/000.tar of source 'c' repeats .*a/000.tar of source 'a' "
                                          r"\(same sha256 in index.json\)"):
        loader(sources, tiny_processor)
    with pytest.raises(StreamError, match=r"copy/000.tar of source 'default' repeats .*a/000.tar"):
        loader([str(tmp_path / "a"), str(tmp_path / "copy")], tiny_processor)
    assert len(loader(sources[:2], tiny_processor)) == 3  # their empty 001.tar are byte-identical


def packed(directory: Path, keys: list[str], per_shard: int) -> Path:
    """``keys`` packed as the packer packs them (``shard_tools.writer``, index.json with key sketches)."""
    entries = []
    shard_writer = ShardWriter(directory, per_shard, None, on_shard=entries.append)
    for position, key in enumerate(keys):
        shard_writer.add(key, members(key), seconds=0.07, truncated=False, position=position)
    shard_writer.close(len(keys))
    write_json(directory / "index.json", Index("train", 80, [index_entry(e) for e in entries]).to_dict())
    return directory


def overlap_warnings(sources, processor) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loader(sources, processor)
    return [str(w.message) for w in seen if issubclass(w.category, StreamWarning)]


def test_a_copied_shard_without_index_beside_its_original_is_warned_with_the_shared_count(tmp_path,
                                                                                           tiny_processor):
    """``cp data/train/000.tar cp2/`` then both as sources: the copy has no index (no sha256 to prove
    it), its header scan sketches its keys, the original's index holds its sketch: a warning names
    both sources, the shards and the count, before anything is trained."""
    packed(tmp_path / "a", [f"clip{i:03d}" for i in range(60)], per_shard=20)
    (tmp_path / "cp2").mkdir()
    shutil.copy(tmp_path / "a" / "000.tar", tmp_path / "cp2")
    found = overlap_warnings([Source("a", str(tmp_path / "a")), Source("b", str(tmp_path / "cp2" / "000.tar"))],
                             tiny_processor)
    assert found == [f"sources 'a' and 'b' share about 20 sample key(s), in 1 pair(s) of shards (first: "
                     f"{tmp_path}/a/000.tar and {tmp_path}/cp2/000.tar): if these are the same samples (a copied "
                     f"shard, a corpus packed twice) each is trained twice per epoch; list them once"]
    [found] = overlap_warnings([Source("a", [str(tmp_path / "a"), str(tmp_path / "cp2")])], tiny_processor)
    assert found.startswith("source 'a' holds about 20 sample key(s) twice, in 1 pair(s) of shards")


def test_a_corpus_packed_twice_with_another_shard_size_is_warned(tmp_path, tiny_processor):
    """Other shard bytes, the same keys: the shards' key sketches (index.json only, nothing read)
    estimate the shared keys across the two shardings."""
    keys = [f"clip{i:03d}" for i in range(240)]
    sources = [Source("a", str(packed(tmp_path / "a", keys, per_shard=80))),
               Source("b", str(packed(tmp_path / "b", keys, per_shard=50)))]
    [found] = overlap_warnings(sources, tiny_processor)
    shared = int(re.match(r"sources 'a' and 'b' share about (\d+) sample key\(s\), in \d+ pair", found)[1])
    assert 180 <= shared <= 300  # 240, estimated from 32 hashes per shard


def test_datasets_with_other_keys_are_not_warned_and_alike_spellings_are_counted(tmp_path, tiny_processor):
    """Disjoint keys give no warning (nor do old indexes without sketches); two datasets that spell
    two keys alike are reported with exactly those two (shards under 32 samples: sketches are whole)."""
    a = packed(tmp_path / "a", [f"dog{i:02d}" for i in range(20)], per_shard=8)
    b = packed(tmp_path / "b", [f"cat{i:02d}" for i in range(20)], per_shard=8)
    write_mel_shards(tmp_path / "old", [3, 3], prefix="dog")  # keys dog000_0000…: another spelling
    assert overlap_warnings([Source("a", str(a)), Source("b", str(b)), Source("c", str(tmp_path / "old"))],
                            tiny_processor) == []
    c = packed(tmp_path / "c", [f"cat{i:02d}" for i in range(18, 30)], per_shard=8)
    [found] = overlap_warnings([Source("b", str(b)), Source("c", str(c))], tiny_processor)
    assert found.startswith(f"sources 'b' and 'c' share about 2 sample key(s), in 1 pair(s) of shards (first: "
                            f"{b}/002.tar and {c}/000.tar)")


def running(pid: int) -> bool:
    """``pid`` exists and has not exited (an orphan's zombie may wait for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", ["raise", "kill", "drop", "signals"])
def test_workers_end_with_their_loader_or_their_process(tmp_path, mode):
    """Workers ignore SIGINT and SIGTERM sent to the whole process group (the main process still reads
    batches, as the trainer does before it saves), yet none outlives its loader or its process: a
    traceback or a normal end with a loader alive exits at once (it used to hang in multiprocessing's
    exit join while the workers ignored its SIGTERM), a SIGKILLed process's workers follow it, a
    dropped loader's workers end."""
    write_mel_shards(tmp_path / "train", [20, 20])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_stream_workers.py"), str(tmp_path / "train"), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)  # its own group, as a shell's job or a scheduler's
    guard, pids = threading.Timer(120, proc.kill), []
    guard.start()
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(map(running, pids))
        if mode == "signals":  # Ctrl-C, then a scheduler's SIGTERM, to every process of the group
            os.killpg(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if mode == "raise":
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == 1 and "a failure with the loader alive" in err
        elif mode == "signals":
            out, err = proc.communicate(timeout=10)
            assert proc.returncode == 0 and json.loads(out) == ["SIGINT", "SIGTERM"], err[-3000:]
        elif mode == "kill":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            assert proc.stdout.readline().strip() == "dropped"
        deadline = time.monotonic() + 3
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if running(pid)]
    finally:
        guard.cancel()
        proc.kill()
        proc.communicate()
        for pid in pids:  # a failure here must not leave them to the rest of the suite
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_skip_limit_is_a_share_of_the_ranks_own_samples(tmp_path, tiny_processor):
    """Rank 0 of 4 reads shard 000 (evaluation order): 2 of its 5 samples lost is 40% of the rank's
    epoch but 10% of all ranks' samples; max_skip_fraction is a share of the rank's own."""
    broken = {"s000_0001", "s000_0003"}
    paths = write_mel_shards(tmp_path / "train", [5, 5, 5, 5], caption=lambda key, j: " " if key in broken else key)
    with pytest.raises(StreamError, match="2 of 5 samples of rank 0 were skipped in epoch 0"), \
            pytest.warns(StreamWarning, match="s000_000[13]"):
        list(loader(paths, tiny_processor, rank=0, world_size=4, train=False, max_skip_fraction=0.3))
    keys, messages, _ = collect(loader(paths, tiny_processor, rank=0, world_size=4, train=False, max_skip_fraction=0.4))
    assert keys == ["s000_0000", "s000_0002", "s000_0004"] and len(messages) == 2
    keys, messages, _ = collect(loader(paths, tiny_processor, rank=1, world_size=4, train=False, max_skip_fraction=0))
    assert keys == tar_keys(paths[1:2]) and not messages


@pytest.mark.parametrize("index", [True, False])
def test_a_sample_with_other_mel_bins_than_its_split_is_skipped(tmp_path, tiny_processor, index):
    """A 128-bin sample among 80-bin ones: refused against index.json's n_mels, or without an index
    against the first sample's, and counted; the batches stay 80-bin."""
    paths = write_mel_shards(tmp_path / "train", [3, 3], index=index)
    members = {**mel_sample_bytes("s001_0000", 9, ["a"]), **mel_sample_bytes("s001_0001", 9, ["b"], n_mels=128),
               **mel_sample_bytes("s001_0002", 9, ["c"])}
    write_members(Path(paths[1]), members)
    if index:
        index_path = tmp_path / "train" / "index.json"
        data = json.loads(index_path.read_text())
        data["shards"][1]["bytes"] = Path(paths[1]).stat().st_size
        index_path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # without an index: counted by a header scan
        stream = loader(paths, tiny_processor, train=False, max_skip_fraction=0.5)
    keys, messages, _ = collect(stream)
    assert keys == [k for k in tar_keys(paths) if k != "s001_0001"] and stream.skipped == 1
    assert any("'s001_0001'" in m and "128 mel bins, the split has 80" in m for m in messages), messages


def test_shards_packed_by_an_earlier_release_still_load(tiny_processor):
    """Shards written by ``main`` at 7754a94 (before the shard layer moved to ``shard_tools``) load
    through their index, each sample equal to its members read with plain tarfile and numpy."""
    folder = ROOT / "tests" / "data" / "shards-7754a94"
    expected = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[:-len(".json")]
                mel = np.load(io.BytesIO(files[key + ".mel.npy"]), allow_pickle=False)
                expected[key] = (mel, json.loads(data)["captions"])
    stream = make_loader(str(folder / "index.json"), tiny_processor.tokenizer, batch_size=2,
                         train=False, num_workers=0)
    seen = {}
    for batch in stream:
        for i, key in enumerate(batch["keys"]):
            if not batch["is_pad"][i]:
                seen[key] = (batch["input_features"][i].float().numpy(), batch["captions"][i])
    assert sorted(seen) == sorted(expected) and len(expected) == 3
    for key, (mel, captions) in expected.items():
        features, got_captions = seen[key]
        np.testing.assert_array_equal(features[:, :mel.shape[1]], mel.astype(np.float32))
        assert got_captions == captions


# ------------------------------------------------------------------------- length bucketing


def frame_spread(batches) -> float:
    """Mean over batches of (longest - shortest) valid frames of their real clips."""
    return float(np.mean([np.ptp(b["frames"][~b["is_pad"]].numpy()) for b in batches if (~b["is_pad"]).sum() > 1]))


def test_bucketing_keeps_every_sample_once_with_equal_batches_and_narrows_the_batches(tmp_path, tiny_processor):
    """Pools of batches sorted by clip length (5-40 frames here): still every sample once over ranks x
    workers with the same batch sizes on every rank, each pool's batches cut from its samples sorted
    by frames, and batches far narrower in length than without bucketing."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6, 0, 7])  # 39 samples
    expected = collections.Counter(tar_keys(paths))
    for world, workers in [(1, 1), (1, 3), (2, 2), (3, 1), (4, 3)]:
        per_rank = [simulate(loader(paths, tiny_processor, rank=r, world_size=world, batch_size=3,
                                    bucket_pool_batches=2).dataset, 0, workers) for r in range(world)]
        assert collections.Counter(k for rank in per_rank for b in rank for k in real_keys(b)) == expected
        assert len({tuple(len(b["keys"]) for b in rank) for rank in per_rank}) == 1, (world, workers)
    paths = write_mel_shards(tmp_path / "big", [60] * 4)
    plain = list(loader(paths, tiny_processor, batch_size=8, shuffle_buffer=40))
    pooled = list(loader(paths, tiny_processor, batch_size=8, shuffle_buffer=40, bucket_pool_batches=10))
    assert sorted(k for b in pooled for k in b["keys"]) == sorted(k for b in plain for k in b["keys"])
    assert frame_spread(pooled) < frame_spread(plain) / 4, (frame_spread(pooled), frame_spread(plain))
    for first in range(0, 30, 10):  # a pool's batches hold disjoint ranges of lengths
        spans = sorted((int(b["frames"].min()), int(b["frames"].max())) for b in pooled[first:first + 10])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
    assert [b["keys"] for b in pooled] != [b["keys"] for b in loader(paths, tiny_processor, batch_size=8,
                                                                      shuffle_buffer=40, bucket_pool_batches=10,
                                                                      seed=1)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_bucketed_batches_are_the_plan_whatever_the_workers_do(tmp_path, tiny_processor, workers):
    """The real DataLoader with 0, 1 or 2 workers hands out the simulated plan (0 and 1 worker the same
    sequence: one logical worker); evaluation buckets too, each sample once in narrower batches."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6])
    settings = {"batch_size": 3, "bucket_pool_batches": 3, "seed": 2}
    real = loader(paths, tiny_processor, num_workers=workers, **settings)
    got = [b["keys"] for b in real]
    assert got == [b["keys"] for b in simulate(real.dataset, 0, max(workers, 1))] and len(got) == len(real)
    if workers < 2:
        assert got == [b["keys"] for b in loader(paths, tiny_processor, num_workers=1 - workers, **settings)]
    evaluation = {"train": False, "num_workers": workers, "batch_size": 3}
    wrapping = write_mel_shards(tmp_path / "eval", [25, 25])  # 5-40 frames, then 5-18: not sorted already
    evaluation["batch_size"] = 5  # a plain batch across the wrap holds 40, 5, 6, 7 and 8 frames
    pooled = list(loader(wrapping, tiny_processor, bucket_pool_batches=3, **evaluation))
    plain = list(loader(wrapping, tiny_processor, **evaluation))
    assert sorted(real_keys(b) for b in pooled) != sorted(real_keys(b) for b in plain)  # other batches,
    assert sorted(k for b in pooled for k in real_keys(b)) == sorted(tar_keys(wrapping))  # each sample once
    spread = [int(b["frames"][~b["is_pad"]].max() - b["frames"][~b["is_pad"]].min()) for b in pooled]
    assert sum(spread) < sum(int(b["frames"][~b["is_pad"]].max() - b["frames"][~b["is_pad"]].min()) for b in plain)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bucketed_stream_resumes_mid_pool_in_a_fresh_process_exactly(tmp_path, tiny_processor, workers):
    """Stopped inside a pool (its batches partly delivered), resumed from the state in a fresh process
    with another hash seed: the uninterrupted run's batches, into the next epoch."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6], captions_per_clip=3)
    urls, state = str(tmp_path / "train"), tmp_path / "state.json"
    settings = {"batch_size": 4, "shuffle_buffer": 7, "seed": 3, "num_workers": workers, "infinite": True,
                "bucket_pool_batches": 3}
    endless = loader(urls, tiny_processor, **settings)
    full = [fingerprint(b) | {"epoch": endless.epoch} for _, b in zip(range(12), endless)]
    assert sorted(k for b in full[:8] for k in b["keys"]) == sorted(tar_keys(paths))
    k = 5  # one worker: 2 of pool 1's batches delivered; two workers: 3 and 2, the second one mid-pool
    head = loader(urls, tiny_processor, **settings)
    assert [fingerprint(b) | {"epoch": 0} for _, b in zip(range(k), head)] == full[:k]
    state.write_text(json.dumps(head.state_dict()))
    tail = run_helper([urls, "--workers", workers, "--batch-size", 4, "--shuffle-buffer", 7, "--bucket", 3,
                       "--take", len(full) - k, "--state-in", state])
    assert tail["batches"] == full[k:] and tail["state"]["bucket_pool_batches"] == 3


@pytest.mark.parametrize("old, new", [((2, 2, 3, 5, 4, 2), (3, 0, 2, 7, 4, 3)), ((3, 1, 2, 4, 2, 3), (1, 3, 5, 500, 4)),
                                      ((1, 2, 4, 3, 1), (2, 2, 4, 3, 3, 2)),
                                      ((2, 0, 3, 500, 4, 2), (2, 2, 3, 500, 4, 2))])
def test_a_bucketed_stream_resumes_elastically_with_the_rest_once(tmp_path, tiny_processor, old, new):
    """Saved mid-pool on every rank under one layout (bucketing on or off), resumed from rank 0's state
    under another: what the old ranks handed out, pools part-delivered included (their lengths are
    read again), plus the re-planned rest (bucketed too) is every sample once, with equal batch counts."""
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6, 0, 7])  # 39 samples
    urls, expected = str(tmp_path / "train"), collections.Counter(tar_keys(paths))
    _, (full, *_), _ = resumed_epoch(urls, tiny_processor, old, None)
    for k in sorted({1, full // 2, full - 1}):
        seen, _, state = resumed_epoch(urls, tiny_processor, old, None, take=k)
        with pytest.warns(StreamWarning, match="re-planned over the new layout"):
            rest, counts, _ = resumed_epoch(urls, tiny_processor, new, state)
        assert len(set(counts)) == 1, (k, counts)
        assert collections.Counter(seen + rest) == expected, k


def test_a_state_saved_before_bucketing_resumes_exactly_and_elastically_into_bucketing(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [9, 4, 13, 6])
    settings = {"seed": 3, "batch_size": 3}
    head = loader(paths, tiny_processor, **settings)
    seen = [k for _, b in zip(range(4), head) for k in real_keys(b)]
    state = {k: v for k, v in head.state_dict().items() if k != "bucket_pool_batches"}
    same = loader(paths, tiny_processor, **settings)
    same.load_state_dict(state)
    assert [b["keys"] for b in same] == [b["keys"] for b in list(loader(paths, tiny_processor, **settings))[4:]]
    bucketed = loader(paths, tiny_processor, bucket_pool_batches=2, **settings)
    with pytest.warns(StreamWarning, match="re-planned"):
        bucketed.load_state_dict(state)
    assert collections.Counter(seen + [k for b in bucketed for k in real_keys(b)]) == collections.Counter(
        tar_keys(paths))
    with pytest.raises(ValueError, match=r"bucket_pool_batches=-1: must be at least 0"):
        loader(paths, tiny_processor, bucket_pool_batches=-1)


def test_a_bucketed_mix_keeps_its_sources_prefixes_and_resumes(tmp_path, tiny_processor):
    """Two weighted sources with caption prefixes, bucketed: each source comes as often as its weight
    says (once per its own epoch), every row carries its own source's prompt, and an elastic resume
    from inside a pool delivers the rest of the epoch once."""
    sources, keys = mixed(tmp_path, {"a": [5, 4], "b": [7, 6, 2]}, {"a": 2, "b": 1})  # a: 16 of 24, b: 8
    sources = [dataclasses.replace(s, prefix=f"style {s.name}:") for s in sources]
    collator = loader(sources, tiny_processor).dataset.collator
    task, prompts = len(collator.task_ids), {s.name: collator.prompt(s.name) for s in sources}
    assert all(prompts.values())
    old, new = (2, 2, 3, 5, 4, 2), (3, 1, 2, 7, 2, 3)
    whole, _, _ = resumed_epoch(sources, tiny_processor, old, None)
    assert sorted(collections.Counter(whole)[k] for k in keys["a"]) == [1] * 2 + [2] * 7
    assert sorted(collections.Counter(whole)[k] for k in keys["b"]) == [0] * 7 + [1] * 8
    stream = loader(sources, tiny_processor, batch_size=3, bucket_pool_batches=2, seed=3)
    for batch in stream:
        assert all(source == (source_of(key) if key else "a") for key, source in zip(batch["keys"], batch["sources"]))
        for row, source in enumerate(batch["sources"]):
            if not batch["is_pad"][row]:
                assert batch["decoder_input_ids"][row, task:task + len(prompts[source])].tolist() == prompts[source]
    seen, _, state = resumed_epoch(sources, tiny_processor, old, None, take=3)
    with pytest.warns(StreamWarning, match="re-planned"):
        rest, counts, after = resumed_epoch(sources, tiny_processor, new, state)
    assert len(set(counts)) == 1 and collections.Counter(seen + rest) == collections.Counter(whole)
    assert [(s["seen"], s["epochs"]) for s in after["sources"]] == [(16, 16 / 9), (8, 8 / 15)]
