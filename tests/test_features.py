"""Features against the references: librosa.load for decoding, WhisperFeatureExtractor for log-mel."""

import io
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from shard_tools.features import (N_FRAMES, AudioDecodeError, clip_features, decode_audio, log_mel, pad_mel,
                               valid_frames)
from shard_tools.shard_format import AUDIO_SUFFIXES
from tests.conftest import ENCODED_CLIPS, write_audio


@pytest.mark.parametrize("suffix,sr,channels", [(".wav", 16000, 1), (".flac", 44100, 2), (".ogg", 22050, 1),
                                                (".mp3", 48000, 2), (".wav", 8000, 3)])
def test_decode_matches_librosa_load(tmp_path, suffix, sr, channels):
    path = write_audio(tmp_path / f"clip{suffix}", seconds=1.3, sr=sr, channels=channels)
    decoded = decode_audio(str(path))
    ours, orig_sr = decoded.audio, decoded.orig_sample_rate
    ref, _ = librosa.load(str(path), sr=16000)  # soundfile + mono mean + soxr_hq: the seed's path
    assert orig_sr == sr
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # the same numbers: channels summed in order, then divided
    # Bytes (as read from a shard member) decode the same as the path.
    np.testing.assert_array_equal(decode_audio(path.read_bytes()).audio, ours)
    assert decoded.seconds == round(len(ref) / 16000, 6)


@pytest.mark.parametrize("name", ENCODED_CLIPS)
def test_other_encoders_decode_as_librosa_loads_them(encoded_clips, name):
    # sox's LAME MP3s announce more frames than decode: neither a reject nor the header's duration
    path = encoded_clips[name]
    assert path.suffix in AUDIO_SUFFIXES
    whole, _ = librosa.load(str(path), sr=16000)  # the reference decodes everything
    full = decode_audio(str(path))
    np.testing.assert_array_equal(full.audio, whole)
    assert full.seconds == round(len(whole) / 16000, 6)
    window = decode_audio(str(path), max_seconds=30)  # what the packer and inference decode
    assert window.seconds == full.seconds and window.orig_sample_rate == full.orig_sample_rate
    np.testing.assert_array_equal(decode_audio(path.read_bytes(), max_seconds=30).audio, window.audio)
    np.testing.assert_allclose(window.audio[:16000 * 29], whole[:16000 * 29], atol=1e-5)
    feats = clip_features(window.audio, seconds=window.seconds)
    assert feats["seconds"] == full.seconds and feats["truncated"] == (len(whole) > 30 * 16000)
    ref = WhisperFeatureExtractor(feature_size=80)(whole, sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(pad_mel(feats["mel"], feats["pad_value"]).astype(np.float32), ref, atol=2e-3)


@pytest.mark.parametrize("name", ["ffmpeg-aac-32k-stereo.m4a", "ffmpeg-opus-24k.webm"])
def test_a_format_without_its_decoder_names_the_missing_ffmpeg(encoded_clips, name, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # ffmpeg gone: libsndfile reads neither AAC nor WebM
    for source in (str(encoded_clips[name]), encoded_clips[name].read_bytes()):
        with pytest.raises(AudioDecodeError, match=r"^cannot decode audio: libsndfile cannot read it "
                                                   r"\(Format not recognised.\) and ffmpeg.* is not installed"):
            decode_audio(source, max_seconds=30)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("n", [1, 199, 201, 16000, 16161, 479999, 480000, 520000])
def test_log_mel_matches_whisper_feature_extractor(n, n_mels):
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000, return_tensors="np")
    ref = ref.input_features[0]  # [n_mels, 3000]
    mel, pad_value = log_mel(audio, n_mels)
    assert mel.shape == (n_mels, valid_frames(n))
    # scipy's FFT, not torch's: float32 rounding differs, up to ~4e-5 where the power is tiny (a
    # fifth of the float16 step a shard stores values near 1 with)
    np.testing.assert_allclose(pad_mel(mel, pad_value), ref, atol=1e-4)
    stored = pad_mel(mel.astype(np.float16), pad_value).astype(np.float32)  # what a shard holds
    np.testing.assert_allclose(stored, ref, atol=2e-3)



@pytest.mark.parametrize("n", [16000, 480000])
def test_a_very_quiet_clip_matches_the_extractor(n):
    # At 1e-6 the log-mel peaks near -9.6, so (max - 8) lies below the 1e-10 power clamp (-10): the
    # padding frames and pad_value come from the clamp (-1.5), not from (max - 8).
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16000
    audio = (1e-6 * np.sin(2 * np.pi * 440 * t) + 1e-7 * rng.standard_normal(n)).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    mel, pad_value = log_mel(audio)
    np.testing.assert_allclose(pad_mel(mel, pad_value), ref, atol=1e-4)
    feats = clip_features(audio)
    np.testing.assert_allclose(pad_mel(feats["mel"], feats["pad_value"]).astype(np.float32), ref, atol=2e-3)
    assert ref.min() == pytest.approx(-1.5) and ref.max() < -1.4  # the clip is as quiet as meant

def test_features_never_import_torch():
    # The packer's workers compute features with numpy and scipy alone: importing torch would cost
    # each of them seconds of start-up.
    code = ("import sys, numpy as np; import shard_tools.pack; from shard_tools.features import clip_features; "
            "clip_features(np.ones(16000, dtype=np.float32)); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "False"


def test_to_float16_is_numpys_cast():
    from shard_tools.features import to_float16

    rng = np.random.default_rng(0)
    n = 2_000_000  # every exponent from subnormal to overflow, both signs
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 20, n)).astype(np.float32)
    ties = np.float32(1.0) + np.arange(64, dtype=np.float32) * np.float32(2.0 ** -11)  # halfway between float16s
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, -65520, 2 ** -14,
                      2 ** -14 * (1 - 2 ** -12), 2 ** -24, 2 ** -25, 2 ** -25 * 1.0001, 1 + 2 ** -11 + 2 ** -20],
                     dtype=np.float32)
    x = np.concatenate([edges, ties, -ties, x])[:7 * (n // 7)].reshape(-1, 7)  # 2-D, as mels are
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    ours = to_float16(x)
    assert ours.dtype == np.float16 and ours.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint16)[~np.isnan(x)], ref.view(np.uint16)[~np.isnan(x)])
    assert np.isnan(ours[np.isnan(x)]).all()


def test_clip_features_of_real_files_match_the_seed_path(tmp_path):
    # The seed: librosa.load(sr=16000) then the extractor on the (30-s padded) clip.
    fe = WhisperFeatureExtractor(feature_size=80)
    for i, (suffix, sr, seconds) in enumerate([(".flac", 44100, 2.0), (".mp3", 22050, 3.1), (".ogg", 48000, 31.0)]):
        path = write_audio(tmp_path / f"c{i}{suffix}", seconds=seconds, sr=sr, channels=2, freq=200 + 300 * i)
        decoded = decode_audio(str(path), max_seconds=30)  # what the packer decodes: the window only
        feats = clip_features(decoded.audio, seconds=decoded.seconds)
        seed_audio, _ = librosa.load(str(path), sr=16000)
        assert feats["seconds"] == pytest.approx(len(seed_audio) / 16000, abs=1e-3)
        ref = fe(seed_audio, sampling_rate=16000, return_tensors="np").input_features[0]
        assert feats["mel"].dtype == np.float16
        assert feats["truncated"] == (seconds > 30)
        np.testing.assert_allclose(pad_mel(feats["mel"], feats["pad_value"]).astype(np.float32), ref, atol=2e-3)


def test_bad_audio_raises_clear_errors(tmp_path):
    with pytest.raises(AudioDecodeError, match="silent"):
        clip_features(np.zeros(16000, dtype=np.float32))
    with pytest.raises(AudioDecodeError, match="zero-length"):
        clip_features(np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioDecodeError, match="cannot decode"):
        decode_audio(b"this is not audio at all" * 10)
    text = tmp_path / "text.flac"  # ffmpeg takes it for a FLAC stream with no channels
    text.write_bytes(b"not audio at all" * 20)
    with pytest.raises(AudioDecodeError, match=r"^cannot decode audio: neither libsndfile .* nor ffmpeg reads it$"):
        decode_audio(str(text))
    empty = io.BytesIO()
    import soundfile
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000, format="WAV")
    with pytest.raises(AudioDecodeError, match="zero-length"):
        decode_audio(empty.getvalue())


def test_pad_mel_works_on_tensors_and_rejects_overlong():
    import torch

    mel = torch.zeros(80, 10, dtype=torch.float16)
    out = pad_mel(mel, -0.25)
    assert out.shape == (80, N_FRAMES) and out.dtype == torch.float16
    assert float(out[0, -1]) == -0.25
    with pytest.raises(ValueError, match="more than"):
        pad_mel(np.zeros((80, N_FRAMES + 1)), 0.0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_the_extractors(n_mels):
    from shard_tools.features import mel_filters

    ref = WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T  # [n_mels, 201] float64
    np.testing.assert_allclose(mel_filters(n_mels), ref.astype(np.float32), rtol=1e-6, atol=1e-9)
