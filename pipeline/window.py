"""Encoder windows: Whisper's encoder on fewer than 30 s of log-mel frames.

HF's ``WhisperEncoder`` refuses any input but 3,000 frames, so a short clip pays for 30 s of
padding. ``fit_encoder`` gives a model an encoder that takes any even number of frames up to 3,000
and adds the first positions of its positional embedding; on 3,000 frames it computes what HF's
does. ``AudioWindow`` is the policy choosing a batch's frames (docs/training.md, 'Encoder windows').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from shard_tools.shard_format import CHUNK_LENGTH, HOP_LENGTH, N_FRAMES, SAMPLE_RATE

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 log-mel frames per second of audio
FRAMES_PER_POSITION = 2  # conv2's stride: one encoder position per two frames
WINDOWS = ("full", "fit")  # or a number of seconds: a fixed window
DEFAULT_STEP_SECONDS = 5.0


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
            raise ValueError(f"window step {step_seconds!r}: must be seconds in (0, {CHUNK_LENGTH}]")
        if isinstance(value, str) and value.strip().lower() in WINDOWS:
            return cls(value.strip().lower(), None, float(step_seconds))
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"audio window {value!r}: must be {allowed}") from None
        if not (math.isfinite(seconds) and 0 < seconds <= CHUNK_LENGTH):
            raise ValueError(f"audio window {value!r}: must be {allowed}")
        return cls("fixed", seconds, float(step_seconds))

    def record(self) -> str | float:
        """The value ``parse`` reads back: what a model's generation config records."""
        return self.seconds if self.mode == "fixed" else self.mode

    def frames(self, longest: int) -> int:
        """The window, in frames, for a batch whose longest clip has ``longest`` valid frames: even
        (whole encoder positions), at least one step (fit) and at most ``N_FRAMES``."""
        if self.mode == "full":
            return N_FRAMES
        if self.mode == "fixed":
            return min(N_FRAMES, _even(self.seconds * FRAMES_PER_SECOND))
        step = _even(self.step_seconds * FRAMES_PER_SECOND)
        return min(N_FRAMES, max(1, math.ceil(longest / step)) * step)


def _even(frames: float) -> int:
    return FRAMES_PER_POSITION * max(1, math.ceil(round(frames, 6) / FRAMES_PER_POSITION))


class FittedWhisperEncoder(WhisperEncoder):
    """HF's encoder without its 3,000-frame check: ``n`` frames give ``n / 2`` positions, each with
    its own row of the positional embedding, as whisper.cpp's ``audio_ctx`` does. Given to a loaded
    model by ``fit_encoder``; the weights and the saved model stay standard Whisper."""

    def forward(self, input_features: torch.Tensor, attention_mask=None, **kwargs) -> BaseModelOutput:
        asked = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if asked:  # HF records them through hooks this forward does not install
            raise ValueError(f"the fitted encoder does not return {', '.join(asked)}")
        frames, most = input_features.shape[-1], self.max_source_positions * FRAMES_PER_POSITION
        if frames % FRAMES_PER_POSITION or not 0 < frames <= most:
            raise ValueError(f"the encoder takes an even number of frames up to {most}, not {frames}")
        embeds = nn.functional.gelu(self.conv1(input_features))
        embeds = nn.functional.gelu(self.conv2(embeds)).permute(0, 2, 1)
        hidden = embeds + self.embed_positions.weight[:embeds.shape[1]]
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue  # LayerDrop, as HF's encoder
            hidden = layer(hidden, None)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


def encoder_of(model: nn.Module) -> WhisperEncoder:
    """The Whisper encoder inside ``model`` (plain, PEFT-wrapped or compiled)."""
    for module in model.modules():
        if isinstance(module, WhisperEncoder):
            return module
    raise ValueError(f"{type(model).__name__} holds no Whisper encoder")


def fit_encoder(model: nn.Module) -> nn.Module:
    """Let ``model``'s encoder take any even number of frames up to 3,000 (in place; returned)."""
    encoder = encoder_of(model)
    if type(encoder) is WhisperEncoder:
        encoder.__class__ = FittedWhisperEncoder
    elif not isinstance(encoder, FittedWhisperEncoder):
        raise ValueError(f"cannot fit {type(encoder).__name__}: not HF's WhisperEncoder")
    return model
