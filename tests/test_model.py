"""The built-in tiny model and the real multilingual tokenizer, offline."""

import json
import logging
import re
import time

import pytest
import torch

from pipeline.collate import prompt_ids
from pipeline.model import (ModelLoadError, generate_captions, load_model, load_processor, recorded_caption_tokens,
                            recorded_prefixes, save_model)


def test_builtin_tokenizer_has_real_whisper_ids(tiny_processor):
    tok = tiny_processor.tokenizer
    # openai/whisper-small's ids (FACTS.md): the prompt, then the BPE of the caption, then <|endoftext|>.
    ids = tok("A dog barks while rain falls.").input_ids
    assert ids[:4] == [50258, 50259, 50358, 50363] and ids[-1] == 50257
    assert ids[4:-1] == [32, 3000, 16202, 82, 1339, 4830, 8804, 13]
    assert len(tok) == 51865  # whisper-small's vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == "A dog barks while rain falls."


def test_tiny_model_generates_and_round_trips(tmp_path, tiny_processor):
    model = load_model("tiny", tiny_processor).eval()
    feats = torch.randn(2, 80, 3000)  # [batch, n_mels, frames]
    out = model.generate(feats, language="en", task="translate", max_new_tokens=4)
    save_model(model, tiny_processor, tmp_path / "m")
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["language"] == "en" and gen["task"] == "translate" and "forced_decoder_ids" not in gen
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    again = WhisperForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    processor = WhisperProcessor.from_pretrained(tmp_path / "m")
    assert processor.tokenizer("x").input_ids == tiny_processor.tokenizer("x").input_ids
    assert torch.equal(again.generate(feats, language="en", task="translate", max_new_tokens=4), out)
    assert isinstance(load_model(str(tmp_path / "m")), WhisperForConditionalGeneration)


def test_offline_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model_config.name=tiny"):
        load_processor("openai/whisper-small-not-cached")


def test_a_missing_folder_says_so_without_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("outputs/does_not_exist/final", "outputs/final", "./model", "/no/such/model"):
        with pytest.raises(ModelLoadError, match=f"model_config.name: no such folder {name};.*model_config.name=tiny"):
            load_processor(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="weights.bin is a file, not a checkpoint folder"):
        load_processor("weights.bin")


def test_an_unreachable_hub_fails_in_seconds_with_the_way_out(monkeypatch):
    from huggingface_hub import constants

    from tests.test_hub import closed_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_processor("a/b", "--model-name")
    message = str(info.value)
    assert "cannot be reached" in message and "--model-name tiny" in message and "HF_HUB_OFFLINE=1" in message
    assert time.monotonic() - start < 30  # the retry storm took about 3 minutes


def test_generate_captions_matches_generate_without_warnings(tiny_processor, monkeypatch):
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", [handler])
    model = load_model("tiny", tiny_processor).eval()
    feats = torch.randn(3, 80, 3000)
    plain = model.generate(feats, language="en", task="translate", do_sample=False, max_new_tokens=5)
    assert any("max_new_tokens" in r.getMessage() for r in said)  # as the seed saw it at every batch
    said.clear()
    for _ in range(2):
        assert torch.equal(generate_captions(model, feats, max_new_tokens=5), plain)
    assert generate_captions(model, feats, num_beams=2, max_new_tokens=3).shape == (3, 3)
    assert [r.getMessage() for r in said] == []


def greedy_by_hand(model, feats: torch.Tensor, prompt: list[int], steps: int) -> list[list[int]]:
    """Greedy decoding one forward per token from ``prompt``, the generation config's
    ``suppress_tokens`` at every token and ``begin_suppress_tokens`` at the first; the new tokens,
    <|endoftext|> repeated after it."""
    eot, out = model.generation_config.eos_token_id, []
    for clip in feats:
        tokens = list(prompt)
        with torch.no_grad():
            encoded = (model.model.encoder(clip[None]).last_hidden_state,)
        while len(tokens) < len(prompt) + steps and tokens[-1] != eot or len(tokens) == len(prompt):
            with torch.no_grad():
                logits = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([tokens])).logits[0, -1]
            logits[model.generation_config.suppress_tokens] = -float("inf")
            if len(tokens) == len(prompt):
                logits[model.generation_config.begin_suppress_tokens] = -float("inf")
            tokens.append(int(logits.argmax()))
        new = tokens[len(prompt):]
        out.append(new + [eot] * (steps - len(new)))
    return out


def test_captions_never_contain_timestamp_tokens(tiny_processor):
    """A timestamp token would make HF generate decode another 30-s window past max_new_tokens."""
    model = load_model("tiny", tiny_processor).eval()
    tid = tiny_processor.tokenizer.convert_tokens_to_ids
    with torch.no_grad():  # every position's last hidden state is v, and a timestamp's logit row is 100 v
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.randn(norm.bias.shape))
        model.proj_out.weight[tid("<|1.00|>")] = 100 * norm.bias
    feats = torch.randn(2, 80, 3000)
    for method in ("static", "hf"):
        tokens = generate_captions(model, feats, max_new_tokens=4, method=method)
        assert tokens.shape == (2, 4) and not ((tokens >= tid("<|0.00|>")) & (tokens <= tid("<|30.00|>"))).any()


def test_a_forced_prefix_is_the_prompt_and_stripped_from_the_caption(tiny_processor):
    model = load_model("tiny", tiny_processor).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights large enough that the prompt and the clip change the caption
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed_positions" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.02 if "embed_tokens" in name else 0.2))
    feats = torch.randn(2, 80, 3000, generator=generator)
    tok = tiny_processor.tokenizer
    task, prefix = tok.prefix_tokens, prompt_ids(tok, "clotho > caption:")
    prefixed = generate_captions(model, feats, max_new_tokens=6, prefix_ids=prefix)
    plain = generate_captions(model, feats, max_new_tokens=6)
    assert prefixed.tolist() == greedy_by_hand(model, feats, task + prefix, 6)
    assert plain.tolist() == greedy_by_hand(model, feats, task, 6)
    assert prefixed.tolist() != plain.tolist()
    assert generate_captions(model, feats[:1], num_beams=2, max_new_tokens=2, prefix_ids=prefix).shape == (1, 2)


def test_a_long_prefix_decodes_as_the_static_decoder_does_with_hf_generate(tiny_processor):
    """Whisper's ``generate`` counts at most 223 prompt tokens into a ``max_length``: a prefix of 230
    to 443 tokens made ``--decoder hf`` refuse its own input."""
    model = load_model("tiny", tiny_processor).eval()
    feats = torch.randn(2, 80, 3000)
    for words in (230, 300, 440):
        prefix = prompt_ids(tiny_processor.tokenizer, " ".join(["word"] * words))
        for max_new_tokens in (5, None):
            hf = generate_captions(model, feats, max_new_tokens=max_new_tokens, prefix_ids=prefix, method="hf")
            static = generate_captions(model, feats, max_new_tokens=max_new_tokens, prefix_ids=prefix)
            assert torch.equal(hf, static)
            assert hf.shape[1] == min(max_new_tokens or 448, 448 - 4 - len(prefix))


def test_recorded_prefixes_round_trip(tmp_path, tiny_processor):
    model = load_model("tiny", tiny_processor)
    assert recorded_prefixes(model) == []
    pairs = [("clotho", "clotho > caption:"), ("audioset", "audioset > keywords:")]
    save_model(model, tiny_processor, tmp_path / "m", prefixes=pairs)
    assert recorded_prefixes(load_model(str(tmp_path / "m"))) == pairs


def test_the_longest_caption_round_trips_and_a_save_without_one_drops_the_old(tmp_path, tiny_processor):
    from transformers import GenerationConfig

    model = load_model("tiny", tiny_processor)
    assert recorded_caption_tokens(model) is None
    save_model(model, tiny_processor, tmp_path / "m", caption_tokens=23)
    assert GenerationConfig.from_pretrained(tmp_path / "m").caption_tokens_longest == 23  # plain transformers reads it
    again = load_model(str(tmp_path / "m"))
    assert recorded_caption_tokens(again) == 23
    save_model(again, tiny_processor, tmp_path / "n")  # trained on other data, length unknown
    assert recorded_caption_tokens(load_model(str(tmp_path / "n"))) is None
    config = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**config, "caption_tokens_longest": "many"}))
    wrong = re.escape(f"{tmp_path / 'm' / 'generation_config.json'}: caption_tokens_longest='many': must be")
    with pytest.raises(ModelLoadError, match=wrong):
        recorded_caption_tokens(load_model(str(tmp_path / "m")))


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_is_unreachable(monkeypatch, caplog):
    from huggingface_hub import constants

    from pipeline import hub
    from pipeline.model import resolve_source
    from tests.test_hub import closed_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(hub, "cached", lambda repo_id: repo_id == "org/cached")
    assert resolve_source("org/cached", "model_config.name") == {"local_files_only": True}
    assert "cannot be reached" in caplog.text and "loading 'org/cached' from the Hugging Face cache" in caplog.text
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_source("org/cached", "model_config.name") == {"local_files_only": True}


def test_a_checkpoint_folder_without_tokenizer_files_is_named_with_the_missing_files(tmp_path, tiny_processor):
    """``from_pretrained`` would load an empty vocabulary and fail later with a ``TypeError``."""
    save_model(load_model("tiny", tiny_processor), tiny_processor, tmp_path / "ckpt")
    for path in (tmp_path / "ckpt").glob("tokenizer*"):
        path.unlink()
    with pytest.raises(ModelLoadError, match=r"^--model-name: .*ckpt has no tokenizer files \(tokenizer.json or "
                                             r"vocab.json and merges.txt\)"):
        load_processor(str(tmp_path / "ckpt"), "--model-name")
