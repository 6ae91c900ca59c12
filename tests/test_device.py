"""pipeline.device: batches reach the device in order and unchanged; the step pads them there to
the batch the collator pads on the host. The side-stream copy needs a GPU (skipped without one)."""

import threading

import pytest
import torch

from pipeline.collate import Collator, expand_features
from pipeline.device import DEVICE_KEYS, in_background, to_device_ahead
from shard_tools.shard_format import decode_sample
from pipeline.stream import make_loader
from shard_tools.tar import iter_samples
from tests.conftest import NEEDS_CUDA, write_mel_shards


def compact_batches(count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_features": torch.randn(2, 80, 7 + i, generator=gen).half(), "pad_values": torch.tensor([-1.5, 0.25]),
             "labels": torch.tensor([[5, 6], [7, -100]]), "decoder_input_ids": torch.tensor([[1, 5], [1, 7]]),
             "is_pad": torch.tensor([False, True]), "keys": [f"k{i}", ""]}
            for i in range(count)]


def test_on_the_cpu_batches_pass_in_order_unchanged():
    batches = compact_batches(3)
    for sent, got in zip(batches, to_device_ahead(iter(batches), "cpu"), strict=True):
        assert got.keys() == sent.keys() and got["keys"] == sent["keys"]
        assert all(torch.equal(got[k], sent[k]) for k in (*DEVICE_KEYS, "is_pad"))


def test_in_background_keeps_order_raises_where_the_source_did_and_stops_its_thread():
    def source():
        yield from range(5)
        raise ValueError("shard 3 is damaged")

    got = []
    with pytest.raises(ValueError, match="shard 3"):
        for item in in_background(source()):
            got.append(item)
    assert got == list(range(5))
    taken = []
    early = in_background(iter(range(100)), depth=2)
    taken += [next(early), next(early)]
    early.close()  # the consumer stops early: the thread ends instead of waiting to hand over more
    assert taken == [0, 1] and not any(t.name == "batches-in-background" for t in threading.enumerate())


def test_the_loader_hands_over_compact_batches_the_step_pads_like_the_collator(tmp_path, tiny_processor):
    urls = write_mel_shards(tmp_path / "train", [5])
    loader = make_loader(urls, tiny_processor.tokenizer, batch_size=5, train=False, device="cpu")
    (batch,) = list(loader)
    assert batch["input_features"].shape[2] < 3000 and batch["pad_values"].shape == (5,)
    with open(urls[0], "rb") as f:  # the same samples, read without the loader
        samples = [decode_sample(raw) for raw in iter_samples(f, urls[0])]
    assert [s["__key__"] for s in samples] == batch["keys"]
    padded = Collator(tiny_processor.tokenizer, train=False)(samples)["input_features"]  # [5, 80, 3000]
    assert torch.equal(expand_features(batch, device="cpu", dtype=torch.float32), padded.float())


@NEEDS_CUDA
def test_on_cuda_each_copy_is_issued_one_batch_ahead_and_arrives_intact():
    batches, pulled = compact_batches(3), []

    def source():
        for i, batch in enumerate(batches):
            pulled.append(i)
            yield {**batch, **{k: batch[k].pin_memory() for k in DEVICE_KEYS}}

    for i, got in enumerate(to_device_ahead(source(), "cuda")):
        assert pulled == list(range(min(i + 2, 3)))  # batch i + 1 was taken (and its copy issued) first
        assert got["input_features"].is_cuda and not got["is_pad"].is_cuda
        full = expand_features(got, dtype=torch.float32)  # on the device, on the current stream
        assert torch.equal(full.cpu(), expand_features(batches[i], dtype=torch.float32))
