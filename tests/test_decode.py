"""pipeline.decode (``generate_captions(method="static")``) against HF ``generate`` (``method="hf"``).

Random models caption every clip alike and never end a caption; ``ending`` makes the output depend on
the clip and the end token win at different steps for different rows, so finished-row handling is
exercised. The whisper-small-dims model keeps small's widths (d_model 768, 12 heads, FFN 3072, the
real vocabulary) with 1 encoder and 2 decoder layers and a 3-s audio context (``max_source_positions``
150, 300 frames), so that its encoder costs the CPU a fraction of a second.
"""

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from pipeline import decode
from pipeline.model import (LANGUAGE, MAX_TARGET_POSITIONS, TASK, caption_generation_config, generate_captions,
                            load_model)
from tests.conftest import NEEDS_CUDA

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PREFIX = (13619, 78, 12331, 31974, 25)  # " clotho > caption:" in the multilingual tokenizer's ids


def ending(model, features_seed: int, clips: int, alpha: float, frames: int = 3000) -> torch.Tensor:
    """Make ``model``'s captions depend on the clip and end at clip-dependent steps: cross-attention
    output scaled up, the end token's embedding (tied to its logit) along a random direction of size
    ``alpha``. Returns clip features ``[clips, 80, frames]`` that differ in level and sign."""
    eot = model.generation_config.eos_token_id
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(10)
        direction = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(1))
        model.model.decoder.embed_tokens.weight[eot] = alpha * direction
    generator = torch.Generator().manual_seed(features_seed)
    features = torch.randn(clips, 80, frames, generator=generator) * 0.1 + torch.linspace(-1, 1, clips)[:, None, None]
    features[:, :40] *= -1
    return features


def lengths(tokens: torch.Tensor, eot: int) -> list[int]:
    ended = tokens == eot
    return torch.where(ended.any(1), ended.int().argmax(1), tokens.shape[1]).tolist()


@pytest.fixture(scope="module")
def tiny_ending(tiny_processor):
    model = load_model("tiny", tiny_processor).eval()
    return model, ending(model, 0, 6, alpha=0.1)


@pytest.fixture(scope="module")
def small_dims(tiny_processor):
    tok = tiny_processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = WhisperConfig(vocab_size=len(tok), d_model=768, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                           decoder_ffn_dim=3072, num_mel_bins=80, max_source_positions=150,
                           max_target_positions=MAX_TARGET_POSITIONS,
                           decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"),
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = caption_generation_config(tok, model.generation_config)
    return model, ending(model, 0, 4, alpha=0.1, frames=300)


@pytest.mark.parametrize("prefix", [(), PREFIX], ids=["no-prefix", "prefix"])
def test_greedy_is_token_identical_to_hf_on_the_tiny_model(tiny_ending, prefix, monkeypatch):
    model, features = tiny_ending
    with torch.inference_mode():
        reference = generate_captions(model, features, max_new_tokens=12, prefix_ids=prefix, method="hf")
        ends = lengths(reference, model.generation_config.eos_token_id)
        assert len(set(ends)) > 1 and min(ends) < 12, f"rows should end at different steps: {ends}"
        # on the CPU: mode "drop" (finished rows leave the batch once they are DROP_SHARE of it)
        assert torch.equal(generate_captions(model, features, max_new_tokens=12, prefix_ids=prefix), reference)
        rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK, prefix)
        # the CUDA graph's step, run eagerly (the capture itself: test_cuda_graph_greedy_equals_hf)
        assert torch.equal(decode.greedy(model, features, rules, 12, mode="mask"), reference)
        monkeypatch.setattr(decode, "DROP_SHARE", 0.0)  # a row leaves the batch as soon as it ends
        assert torch.equal(decode.greedy(model, features, rules, 12, mode="drop"), reference)


@pytest.mark.parametrize("prefix", [(), PREFIX], ids=["no-prefix", "prefix"])
def test_greedy_is_token_identical_to_hf_on_whisper_small_dims(small_dims, prefix):
    model, features = small_dims
    with torch.inference_mode():
        reference = generate_captions(model, features, max_new_tokens=8, prefix_ids=prefix, method="hf")
        fast = generate_captions(model, features, max_new_tokens=8, prefix_ids=prefix)
    ends = lengths(reference, model.generation_config.eos_token_id)
    assert len(set(ends)) > 1 and min(ends) < 8, f"rows should end at different steps: {ends}"
    assert torch.equal(fast, reference)


def test_the_prefix_is_forced_and_stripped(tiny_ending):
    """HF path with a prefix = plain HF generate from the prompt + prefix as decoder_input_ids, the
    prompt and prefix cut off; and the caption differs from the one without the prefix."""
    model, features = tiny_ending
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id, gen.lang_to_id["<|en|>"], gen.task_to_id["translate"],
              gen.no_timestamps_token_id, *PREFIX]
    with torch.inference_mode():
        plain = model.generate(input_features=features[:2], decoder_input_ids=torch.tensor([prompt] * 2),
                               max_new_tokens=6, do_sample=False)
        ours = generate_captions(model, features[:2], max_new_tokens=6, prefix_ids=PREFIX, method="hf")
        without = generate_captions(model, features[:2], max_new_tokens=6)
    assert torch.equal(ours, plain[:, -ours.shape[1]:] if plain.shape[1] > 6 else plain)
    assert not torch.equal(ours, without)


@pytest.mark.parametrize("beams,prefix", [(2, PREFIX), (4, ())], ids=["2-prefix", "4"])
def test_beam_search_equals_hf_beams(tiny_ending, beams, prefix):
    model, features = tiny_ending
    with torch.inference_mode():
        reference = generate_captions(model, features[:3], num_beams=beams, max_new_tokens=8, prefix_ids=prefix,
                                      method="hf")
        fast = generate_captions(model, features[:3], num_beams=beams, max_new_tokens=8, prefix_ids=prefix)
    assert torch.equal(fast, reference)


def test_beam_search_equals_hf_on_whisper_small_dims(small_dims):
    model, features = small_dims
    with torch.inference_mode():
        reference = generate_captions(model, features, num_beams=3, max_new_tokens=6, method="hf")
        fast = generate_captions(model, features, num_beams=3, max_new_tokens=6)
    assert torch.equal(fast, reference)


def test_caption_length_is_capped_by_the_decoder_positions(tiny_ending):
    model, _ = tiny_ending
    long_prefix = (PREFIX * 90)[:440]  # 4 + 440 prompt tokens: 4 positions left of 448
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK, long_prefix)
    assert decode.max_new_tokens_for(model, rules, 30) == 4
    assert decode.max_new_tokens_for(model, rules, None) == 4
    short = decode.decode_rules(model.generation_config, LANGUAGE, TASK)
    assert decode.max_new_tokens_for(model, short, None) == MAX_TARGET_POSITIONS - 4
    with pytest.raises(ValueError, match="leaves no room"):
        decode.max_new_tokens_for(model, decode.decode_rules(model.generation_config, LANGUAGE, TASK, PREFIX * 90), 5)


def test_settings_the_static_path_does_not_implement_are_refused(tiny_ending):
    model, features = tiny_ending
    gen = model.generation_config
    saved = gen.repetition_penalty
    try:
        gen.repetition_penalty = 1.3
        with pytest.raises(ValueError, match=r"generation_config.repetition_penalty=1.3 .*--decoder hf"):
            generate_captions(model, features[:1], max_new_tokens=2)
    finally:
        gen.repetition_penalty = saved
    with pytest.raises(ValueError, match="decoding method 'fast'"):
        generate_captions(model, features[:1], max_new_tokens=2, method="fast")


@NEEDS_CUDA
def test_cuda_graph_greedy_equals_hf(tiny_processor, caplog, monkeypatch):
    """Each mode equals HF on the GPU; a second batch of the same shape replays the graph the first
    captured, and the caller's stream is current throughout."""
    monkeypatch.setattr(decode, "GRAPHS", decode.GraphCache(decode.GRAPH_CACHE_SIZE))
    model = load_model("tiny", tiny_processor).eval()
    features = ending(model, 0, 6, alpha=0.1)
    model, features = model.cuda(), features.cuda()
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK, PREFIX)
    stream = torch.cuda.current_stream()
    with torch.inference_mode():
        reference = generate_captions(model, features, max_new_tokens=20, prefix_ids=PREFIX, method="hf")
        for mode in decode.GREEDY_MODES:
            assert torch.equal(decode.greedy(model, features, rules, 20, mode=mode), reference), mode
        graphs = [graph.replay for graph in decode.GRAPHS.graphs.values()]
        assert len(graphs) == 1 and torch.cuda.current_stream() == stream
        other = features.flip(0) * 0.5
        reference = generate_captions(model, other, max_new_tokens=20, prefix_ids=PREFIX, method="hf")
        assert torch.equal(decode.greedy(model, other, rules, 20), reference)
        assert [graph.replay for graph in decode.GRAPHS.graphs.values()] == graphs
    assert torch.cuda.current_stream() == stream
    assert not decode._capture_failed and "capture" not in caplog.text


@NEEDS_CUDA
def test_a_capture_that_fails_on_the_gpu_decodes_eagerly_on_the_callers_stream(tiny_processor, caplog, monkeypatch):
    """A host read inside the capture (not capturable) fails it: the reason kept is that read's error,
    not ``capture_end``'s, the caller's stream is current again and the batch decodes to HF's ids."""
    monkeypatch.setattr(decode, "GRAPHS", decode.GraphCache(decode.GRAPH_CACHE_SIZE))
    monkeypatch.setattr(decode, "_capture_failed", "")
    model = load_model("tiny", tiny_processor).eval()
    features = ending(model, 0, 6, alpha=0.1)
    model, features = model.cuda(), features.cuda()
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK)

    def read_in_capture(module, args):
        if torch.cuda.is_current_stream_capturing():
            args[0].sum().item()

    model.proj_out.register_forward_pre_hook(read_in_capture)
    stream = torch.cuda.current_stream()
    with torch.inference_mode():
        reference = generate_captions(model, features, max_new_tokens=12, method="hf")
        assert torch.equal(decode.greedy(model, features, rules, 12), reference)
    assert torch.cuda.current_stream() == stream
    assert "capturing" in decode._capture_failed and "previous error" not in decode._capture_failed
    assert "decoding without a graph" in caplog.text and not decode.GRAPHS.graphs


@pytest.mark.parametrize("length_penalty", [0.5, 2.0])
def test_beam_search_length_penalty_and_early_stop_equal_hf(tiny_ending, length_penalty):
    """``length_penalty`` from the generation config, with hypotheses ending at different steps so
    that finished ones are ranked by normalised score and the early stop compares the best running
    beam's normalised score with them: both must follow HF."""
    model, features = tiny_ending
    gen = model.generation_config
    saved = gen.length_penalty
    try:
        with torch.inference_mode():
            plain = generate_captions(model, features, num_beams=3, max_new_tokens=12, method="hf")
            gen.length_penalty = length_penalty
            reference = generate_captions(model, features, num_beams=3, max_new_tokens=12, method="hf")
            fast = generate_captions(model, features, num_beams=3, max_new_tokens=12)
    finally:
        gen.length_penalty = saved
    ends = lengths(reference, gen.eos_token_id)
    assert len(set(ends)) > 1 and min(ends) < 12, f"hypotheses should end at different steps: {ends}"
    assert not torch.equal(reference, plain), "the penalty should change some caption"
    assert torch.equal(fast, reference)


class FakeStream:
    """A CUDA stream's stand-in: ``wait_stream`` is all the decoder asks of one."""

    def __init__(self, name: str = "side"):
        self.name = name

    def wait_stream(self, other) -> None:
        pass


class FakeCuda:
    """``torch.cuda``'s streams, graph and pool on the CPU, for the capture's own code path: the
    graph's capture marks ``capturing`` (a step then fails where a real capture would) and its end
    raises as a capture invalidated by an earlier error does. Synchronising the device or emptying
    its caches (what entering ``torch.cuda.graph`` does) fails the test."""

    def __init__(self, monkeypatch):
        self.current = self.caller = FakeStream("caller")
        self.capturing = False
        self.ended = 0
        for name in ("current_stream", "set_stream", "graph_pool_handle", "Stream", "CUDAGraph", "synchronize",
                     "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def synchronize(self, device=None):
        raise AssertionError("the capture synchronised the device")

    def empty_cache(self):
        raise AssertionError("the capture emptied the device's block cache")

    def current_stream(self):
        return self.current

    def set_stream(self, stream) -> None:
        self.current = stream

    def graph_pool_handle(self):
        return "pool"

    Stream = FakeStream

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        fake = self

        class Graph:
            def capture_begin(self, pool, capture_error_mode):
                assert fake.current is not fake.caller, "the capture must run on the side stream"
                fake.capturing = True

            def capture_end(self):
                fake.capturing, fake.ended = False, fake.ended + 1
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        return Graph()


def test_graph_cache_captures_once_per_shape_and_replays(tiny_ending, monkeypatch):
    """A later batch of the same shape replays the graph captured for the first (its buffers
    refilled), as does a batch of up to half fewer rows (padded); other shapes capture their own,
    every capture into the one pool; at most ``size`` graphs are kept, and new weights drop them all.
    Captions stay HF's."""
    model, features = tiny_ending
    FakeCuda(monkeypatch)  # the pool and the side stream
    monkeypatch.setattr(decode, "GRAPHS", decode.GraphCache(2))
    monkeypatch.setattr(decode, "_capture_failed", "")
    captures, replays = [], []

    def fake_capture(step, pool, stream):  # the step, run eagerly as the replay
        captures.append(pool)

        def replay():
            replays.append(len(captures))
            step()
        return replay

    monkeypatch.setattr(decode, "_capture", fake_capture)
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK)

    def check(batch, captured):
        with torch.inference_mode():
            reference = generate_captions(model, batch, max_new_tokens=12, method="hf")
            replays.clear()
            assert torch.equal(decode.greedy(model, batch, rules, 12, mode="graph"), reference)
        assert len(captures) == captured and replays and set(replays) == {captured}

    check(features[:3], 1)
    check(features[3:], 1)  # same shape: replayed, not captured
    check(features[4:], 1)  # two rows ride the three-row graph, the third one padding
    check(features[:1], 2)  # one row: a graph of its own
    assert set(captures) == {"pool"}
    check(features, 3)  # six rows: the least recently used (three rows) goes
    assert len(decode.GRAPHS.graphs) == 2
    check(features[:3], 3)  # rides the six-row graph
    check(features[4:], 4)  # the three-row graph two rows rode is gone
    loaded = model.proj_out.weight
    model.proj_out.weight = torch.nn.Parameter(loaded.detach().clone())  # moved: a graph would read the old memory
    try:
        check(features[:3], 5)
        assert len(decode.GRAPHS.graphs) == 1
    finally:
        model.proj_out.weight = loaded


def test_a_failed_capture_restores_the_stream_and_records_the_first_error(tiny_ending, monkeypatch, caplog):
    """A step that fails inside the capture (then ``capture_end`` fails too): the caller's stream is
    current again, the reason kept is the first error, and the batch decodes eagerly to HF's ids."""
    model, features = tiny_ending
    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(decode, "GRAPHS", decode.GraphCache(2))
    monkeypatch.setattr(decode, "_capture_failed", "")

    def refuse_in_capture(module, args):
        if cuda.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")

    hook = model.proj_out.register_forward_pre_hook(refuse_in_capture)
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK)
    try:
        with torch.inference_mode():
            reference = generate_captions(model, features, max_new_tokens=12, method="hf")
            assert torch.equal(decode.greedy(model, features, rules, 12, mode="graph"), reference)
            assert cuda.ended == 1 and cuda.current is cuda.caller
            assert decode._capture_failed == "operation not permitted when stream is capturing"
            assert "capture of the decoder step failed (operation not permitted" in caplog.text
            assert not decode.GRAPHS.graphs
            # from now on eagerly, without trying again
            two = generate_captions(model, features[:2], max_new_tokens=12, method="hf")
            assert torch.equal(decode.greedy(model, features[:2], rules, 12, mode="graph"), two)
            assert cuda.ended == 1
    finally:
        hook.remove()


def test_beam_search_reads_the_host_every_sync_every_tokens(tiny_ending, monkeypatch):
    """Per token, beam search neither copies to the device from the host nor reads a result back
    (each would wait for the GPU there): the early stop is read every ``SYNC_EVERY`` tokens."""
    model, features = tiny_ending
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK)
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: reads.append("tensor") or tensor(*a, **k))
    monkeypatch.setattr(decode, "SYNC_EVERY", 4)
    with torch.inference_mode():
        tokens = decode.beam_search(model, features[:2], rules, 16, num_beams=2)
    # the prompt in, the early stop at tokens 4, 8, 12 (if it gets there), the output's width
    assert len(reads) <= 2 + 16 // 4, reads
    assert tokens.shape[0] == 2
