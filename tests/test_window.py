"""Encoder windows: the fitted encoder against HF's own encoder and ``generate``, and the window policy."""

import copy

import pytest
import torch

from pipeline.model import FittedWhisperEncoder, builtin_tiny_model, encoder_of, fit_encoder
from pipeline.window import AudioWindow
from shard_tools.shard_format import N_FRAMES


@pytest.fixture(scope="module")
def tiny_pair(tiny_processor):
    """(HF's model, the same weights with a fitted encoder), in eval mode."""
    reference = builtin_tiny_model(tiny_processor.tokenizer).eval()
    return reference, fit_encoder(copy.deepcopy(reference)).eval()


def test_the_fitted_encoder_on_a_full_window_is_hfs_encoder(tiny_pair, tiny_processor):
    reference, fitted = tiny_pair
    assert type(encoder_of(fitted)) is FittedWhisperEncoder and type(encoder_of(reference)) is not FittedWhisperEncoder
    features = torch.randn(2, 80, N_FRAMES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference.model.encoder(features).last_hidden_state
        got = fitted.model.encoder(features).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    forced = [tiny_processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|en|>", "<|translate|>", "<|notimestamps|>")]
    kwargs = dict(max_new_tokens=6, do_sample=False, forced_decoder_ids=None,
                  decoder_input_ids=torch.tensor([[reference.generation_config.decoder_start_token_id, *forced]] * 2))
    with torch.no_grad():
        assert fitted.generate(features, **kwargs).tolist() == reference.generate(features, **kwargs).tolist()


def test_a_fitted_batch_gives_each_clip_its_rows_alone_in_the_same_window(tiny_pair):
    _, fitted = tiny_pair
    window = AudioWindow.parse("fit").frames(420)
    assert window == 500
    clips = [torch.randn(80, frames, generator=torch.Generator().manual_seed(frames)) for frames in (150, 420)]
    pad_values = (-0.5, -0.7)
    batch = torch.stack([torch.nn.functional.pad(c, (0, window - c.shape[1]), value=v) for c, v in zip(clips, pad_values)])
    with torch.no_grad():
        together = fitted.model.encoder(batch).last_hidden_state
        alone = [fitted.model.encoder(row[None]).last_hidden_state[0] for row in batch]
    assert together.shape == (2, window // 2, fitted.config.d_model)
    for row, single in zip(together, alone):
        torch.testing.assert_close(row, single, rtol=1e-5, atol=1e-5)


def test_the_fitted_encoder_trains_and_refuses_odd_or_overlong_windows(tiny_pair):
    _, fitted = tiny_pair
    model = copy.deepcopy(fitted).train()
    features = torch.randn(1, 80, 1000)
    loss = model(input_features=features, decoder_input_ids=torch.tensor([[1, 2, 3]])).logits.square().mean()
    loss.backward()
    assert encoder_of(model).conv1.weight.grad is not None
    for frames in (999, N_FRAMES + 2):
        with pytest.raises(ValueError, match=f"even number of frames up to {N_FRAMES}, not {frames}"):
            encoder_of(model)(torch.randn(1, 80, frames))


@pytest.mark.parametrize("value, longest, frames", [
    ("full", 10, N_FRAMES), ("fit", 1, 500), ("fit", 502, 500), ("fit", 503, 1000), ("fit", 2999, N_FRAMES),
    ("FIT", 3000, N_FRAMES), (10, 2999, 1000), ("7.5", 1, 750), (0.015, 1, 2), (30, 1, N_FRAMES)])
def test_the_window_policy_picks_even_frames_within_whispers_window(value, longest, frames):
    assert AudioWindow.parse(value).frames(longest) == frames


@pytest.mark.parametrize("seconds", [1, 2.5, 10, 25])
def test_a_clip_of_whole_steps_fits_a_window_of_as_many_seconds_and_loses_nothing(seconds):
    """A clip of s seconds has s x 100 + 2 valid frames (the packer's own count): a fit window of s
    seconds holds it without a cut, as Whisper's 30-s window holds a 30-s clip."""
    from pipeline.window import loses_audio
    from shard_tools.features import valid_frames

    frames = valid_frames(round(seconds * 16000))
    window = AudioWindow.parse("fit", step_seconds=seconds).frames(frames)
    assert window == min(N_FRAMES, 2 * -(-round(seconds * 100) // 2)) and not loses_audio(frames, window)
    assert loses_audio(frames + 1, window) and AudioWindow.parse("fit", seconds).frames(frames + 1) > window


def test_a_window_step_rounds_fit_windows_and_records_its_policy():
    assert AudioWindow.parse("fit", step_seconds=2).frames(202) == 200
    assert AudioWindow.parse("fit", step_seconds=2).frames(203) == 400
    assert AudioWindow.parse("fit", step_seconds=0.33).frames(1) == 34  # 33 frames rounded up to whole positions
    assert [AudioWindow.parse(v).record() for v in ("full", "fit", "12")] == ["full", "fit", 12.0]


@pytest.mark.parametrize("value", ["half", 0, -1, 31, float("nan"), None])
def test_a_window_outside_whispers_window_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"audio_window=.*: must be 'full', 'fit' or seconds in \(0, 30\]"):
        AudioWindow.parse(value)
    with pytest.raises(ValueError, match=r"audio_window_step=0: must be seconds in \(0, 30\]"):
        AudioWindow.parse("fit", step_seconds=0)


def test_a_saved_model_records_its_window_and_loads_with_a_fitted_encoder(tmp_path, tiny_processor):
    from pipeline.model import load_model, recorded_window, save_model

    model = load_model("tiny", tiny_processor)
    assert type(encoder_of(model)) is FittedWhisperEncoder and recorded_window(model) == AudioWindow()
    save_model(model, tiny_processor, tmp_path / "fit", window=AudioWindow.parse("fit", 2.5))
    save_model(model, tiny_processor, tmp_path / "ten", window=AudioWindow.parse(10))
    fit, ten = (load_model(str(tmp_path / name)) for name in ("fit", "ten"))
    assert recorded_window(fit) == AudioWindow("fit", None, 2.5) and recorded_window(ten).frames(1) == 1000
    assert type(encoder_of(fit)) is FittedWhisperEncoder
    config = (tmp_path / "fit" / "config.json").read_text()
    assert '"WhisperForConditionalGeneration"' in config and "Fitted" not in config  # a standard Whisper folder


@pytest.mark.parametrize("beams", [1, 3])
def test_both_decoders_caption_a_fitted_window_alike(tiny_pair, beams):
    from pipeline.model import generate_captions

    _, fitted = tiny_pair
    features = torch.randn(3, 80, 500, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        static = generate_captions(fitted, features, beams, 6, method="static")
        hf = generate_captions(fitted, features, beams, 6, method="hf")
    pad = fitted.generation_config.pad_token_id
    assert [[t for t in row if t != pad] for row in static.tolist()] == [[t for t in row if t != pad] for row in hf.tolist()]
