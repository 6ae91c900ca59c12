"""The built-in tiny model and the real multilingual tokenizer, offline."""

import json

import pytest
import torch

from pipeline.model import ModelLoadError, load_model, load_processor, save_model


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
