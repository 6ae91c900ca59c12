"""Shared test data, made inside the tests: synthetic audio and small shards in the documented format.

``write_mel_shards`` (``shard_tools.synth``, shared with bench/) writes shards directly (plain
``tarfile``, as docs/FORMAT.md specifies) so that the streaming, training and inference tests do not
depend on the packer; ``tests/test_pack.py`` checks that the packer writes this same format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from shard_tools.synth import mel_sample_bytes, write_mel_shards  # noqa: F401 (imported by the tests from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub from a test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone with a little noise: ``[samples]`` or ``[samples, channels]`` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
    if channels == 1:
        return mono.astype(np.float32)
    return np.stack([mono * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0, channels: int = 1,
                seed: int = 0) -> Path:
    """Write a synthetic clip; the format follows the suffix (.wav, .flac, .ogg, .mp3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}[path.suffix]
    subtype = {"OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}.get(fmt)
    soundfile.write(str(path), tone(seconds, sr, freq, channels, seed), sr, format=fmt, subtype=subtype)
    return path


# Audio the project did not write: espeak-ng speech (22,050 Hz mono) re-encoded by sox and ffmpeg, as
# users' corpora come. ``{name: (tool, options before the output, sox effects after it)}``; the
# name's suffix picks the container. sox writes MP3 with LAME, whose header announces more frames
# than decode; the 34-s one reaches past the 30-s window.
ENCODED_CLIPS = {
    "espeak.wav": ("espeak-ng", [], []),
    "sox-lame-44k-stereo.mp3": ("sox", ["-r", "44100", "-c", "2"], []),
    "sox-lame-8k.mp3": ("sox", ["-r", "8000"], []),
    "sox-lame-34s.mp3": ("sox", ["-r", "22050"], ["repeat", "10"]),
    "sox-vorbis-48k-stereo.ogg": ("sox", ["-r", "48000", "-c", "2"], []),
    "sox-11k-stereo.aiff": ("sox", ["-r", "11025", "-c", "2"], []),
    "ffmpeg-lame-16k.mp3": ("ffmpeg", ["-ar", "16000", "-c:a", "libmp3lame"], []),
    "ffmpeg-aac-32k-stereo.m4a": ("ffmpeg", ["-ar", "32000", "-ac", "2", "-c:a", "aac"], []),
    "ffmpeg-adts-22k.aac": ("ffmpeg", ["-ar", "22050", "-c:a", "aac"], []),
    "ffmpeg-opus-stereo.opus": ("ffmpeg", ["-ar", "48000", "-ac", "2", "-c:a", "libopus"], []),
    "ffmpeg-opus-24k.webm": ("ffmpeg", ["-ar", "24000", "-c:a", "libopus"], []),
}


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")


@pytest.fixture(scope="session")
def encoded_clips(tmp_path_factory) -> dict[str, Path]:
    """``ENCODED_CLIPS`` written once per session (about 1 s of CPU): ``{name: path}``."""
    missing = [tool for tool in ("espeak-ng", "sox", "ffmpeg") if shutil.which(tool) is None]
    if missing:  # under CI this skip fails (pytest_runtest_makereport)
        pytest.skip(f"needs {', '.join(missing)} on the PATH (scripts/install.sh installs them)")
    root = tmp_path_factory.mktemp("encoded")
    speech = root / "espeak.wav"
    _run(["espeak-ng", "-w", str(speech), "A dog barks twice while the rain falls on a tin roof."])
    for name, (tool, options, effects) in ENCODED_CLIPS.items():
        if tool == "sox":
            _run(["sox", str(speech), *options, str(root / name), *effects])
        elif tool == "ffmpeg":
            _run(["ffmpeg", "-v", "error", "-i", str(speech), *options, str(root / name)])
    return {name: root / name for name in ENCODED_CLIPS}


NEEDS_CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


def pytest_configure(config):
    # The references load m4a and webm with librosa.load, which warns each time it hands a file to
    # audioread (the ffmpeg fallback the code under test follows): expected, not news.
    config.addinivalue_line("filterwarnings", "ignore:PySoundFile failed:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:librosa.core.audio.__audioread_load:FutureWarning")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (``CI`` set), a skipped test fails: scripts/install.sh installs everything the suite
    needs, so a skip there means a dependency went missing, not an optional extra. Only ``NEEDS_CUDA``
    may skip there: no registry provides a GPU (the device machine runs those tests)."""
    report = (yield).get_result()
    needs_cuda = any(mark.kwargs.get("reason") == NEEDS_CUDA.kwargs["reason"] for mark in item.iter_markers("skipif"))
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail") and not needs_cuda:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under CI (every dependency is installed there): {reason}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on 2 busy cores, two spinning threads made the tiny model's many small
    ops about 3x slower. Restored afterwards for the rest of the session."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_processor():
    from pipeline.model import load_processor

    return load_processor("tiny")
