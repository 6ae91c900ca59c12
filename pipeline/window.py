"""Encoder windows: how many log-mel frames Whisper's encoder sees for a batch (torch-free, so the
config can check it). The encoder that takes them is ``pipeline.model.fit_encoder``'s
(docs/training.md, 'Encoder windows')."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shard_tools.shard_format import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, SAMPLE_RATE

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 log-mel frames per second of audio
FRAMES_PER_POSITION = 2  # conv2's stride: one encoder position per two frames
WINDOWS = ("full", "fit")  # or a number of seconds: a fixed window
DEFAULT_STEP_SECONDS = 5.0
# A clip of s seconds has s x 100 + 2 valid frames: the centred STFT's last two frames are centred on
# its end and 10 ms after it, and see only up to 12.5 ms of it. A window of W seconds holds W x 100
# frames, as Whisper's 30-s window holds 3,000 of a 30-s clip's 3,001: those edge frames are left out
# of the rounding (a 10-s clip fits a 10-s window) and are not counted as cut.
EDGE_FRAMES = math.ceil(N_FFT / 2 / HOP_LENGTH)


@dataclass(frozen=True)
class AudioWindow:
    """How many frames the encoder sees: ``full`` (Whisper's 3,000), ``fit`` (a batch's longest clip
    rounded up to a multiple of ``step_seconds``) or ``seconds`` (a fixed window; longer clips cut)."""
    mode: str = "full"
    seconds: float | None = None
    step_seconds: float = DEFAULT_STEP_SECONDS

    @classmethod
    def parse(cls, value, step_seconds: float = DEFAULT_STEP_SECONDS) -> "AudioWindow":
        """``"full"``, ``"fit"`` or a number of seconds (as a YAML value or a string); ValueError
        naming the value and what is allowed otherwise."""
        allowed = f"'full', 'fit' or seconds in (0, {CHUNK_LENGTH}]"
        if not (isinstance(step_seconds, (int, float)) and 0 < step_seconds <= CHUNK_LENGTH):
            raise ValueError(f"audio_window_step={step_seconds!r}: must be seconds in (0, {CHUNK_LENGTH}]")
        if isinstance(value, str) and value.strip().lower() in WINDOWS:
            return cls(value.strip().lower(), None, float(step_seconds))
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"audio_window={value!r}: must be {allowed}") from None
        if not (math.isfinite(seconds) and 0 < seconds <= CHUNK_LENGTH):
            raise ValueError(f"audio_window={value!r}: must be {allowed}")
        return cls("fixed", seconds, float(step_seconds))

    def __str__(self) -> str:
        if self.mode == "fit":
            return f"fit ({self.step_seconds:g}-s steps)"
        return f"{self.seconds:g} s" if self.mode == "fixed" else self.mode

    def record(self) -> str | float:
        """The value ``parse`` reads back: what a model's generation config records."""
        return self.seconds if self.mode == "fixed" else self.mode

    def frames(self, longest: int) -> int:
        """The window, in frames, for a batch whose longest clip has ``longest`` valid frames: even
        (whole encoder positions), at least one step (fit; the clip's two edge frames left out) and
        at most ``N_FRAMES``."""
        if self.mode == "full":
            return N_FRAMES
        if self.mode == "fixed":
            return min(N_FRAMES, _even(self.seconds * FRAMES_PER_SECOND))
        step = _even(self.step_seconds * FRAMES_PER_SECOND)
        return min(N_FRAMES, max(1, math.ceil((longest - EDGE_FRAMES) / step)) * step)


def _even(frames: float) -> int:
    return FRAMES_PER_POSITION * max(1, math.ceil(round(frames, 6) / FRAMES_PER_POSITION))


def loses_audio(frames, window: int):
    """Whether a clip of ``frames`` valid frames (an int, or a tensor of them) is cut by a ``window``
    of frames: more than its edge frames fall outside."""
    return frames > window + EDGE_FRAMES
