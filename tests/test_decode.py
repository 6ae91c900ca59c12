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
def test_cuda_graph_greedy_equals_hf(tiny_processor, caplog):
    model = load_model("tiny", tiny_processor).eval()
    features = ending(model, 0, 6, alpha=0.1)
    model, features = model.cuda(), features.cuda()
    rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK, PREFIX)
    with torch.inference_mode():
        reference = generate_captions(model, features, max_new_tokens=20, prefix_ids=PREFIX, method="hf")
        for mode in decode.GREEDY_MODES:
            assert torch.equal(decode.greedy(model, features, rules, 20, mode=mode), reference), mode
    assert not decode._capture_failed and "capture" not in caplog.text


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
