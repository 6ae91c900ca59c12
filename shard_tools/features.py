"""Audio decoding and Whisper log-mel features: pure functions shared by the packer and inference.

Decoding follows ``librosa.load(path, sr=16000)``; the log-mel reproduces ``WhisperFeatureExtractor``
on the valid frames only (the rest of the 30-s window is one constant per clip, ``pad_value``).
Never imports torch. Details and accuracy: docs/FORMAT.md, "The log-mel".
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile
import scipy.fft
import soxr
import threadpoolctl

from shard_tools.fileio import file_type
from shard_tools.shard_format import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE

LOG_FLOOR = -10.0  # log10 of the 1e-10 power clamp: the log-mel of a zero frame
DYNAMIC_RANGE = 8.0  # the extractor floors log-mel at (max - 8)
# Decoded past the 30-s window so that resampling near its edge sees the same neighbours as a
# decode of the whole file (soxr HQ's filter is a few ms long).
DECODE_MARGIN_SECONDS = 1.0

# libsndfile's frame count for these codecs is an estimate (MP3's from the Xing header or the
# bitrate, before the encoder's delay and padding; LAME through sox announces more than decodes),
# so their duration and completeness come from decoding to the end. Other formats' counts are exact.
ESTIMATED_LENGTH_SUBTYPES = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS"})
COUNT_BLOCK_FRAMES = 1 << 16  # frames decoded (and dropped) per read past the kept window

TRUNCATED_LOG = re.compile(r"^(data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)

# soxr "HQ" is what librosa.resample calls for its default res_type "soxr_hq".
RESAMPLE_QUALITY = "HQ"


class AudioDecodeError(ValueError):
    """Audio that cannot be decoded or holds nothing to describe (the message says why)."""


@dataclass(frozen=True)
class DecodedAudio:
    audio: np.ndarray  # [samples] float32 mono at the requested rate (cut when max_seconds is given)
    orig_sample_rate: int
    seconds: float  # duration of the whole input, also when only its start was decoded


def decode_audio(source: str | os.PathLike | bytes | BinaryIO, sr: int = SAMPLE_RATE,
                 max_seconds: float | None = None) -> DecodedAudio:
    """Decode a file path, bytes or file object to float32 mono at ``sr``, as ``librosa.load`` does.

    With ``max_seconds`` only that much (plus a resampling margin) is kept; ``seconds`` is still the
    whole file's duration. Where the header's frame count is exact (WAV, AIFF, FLAC) only the kept
    window is decoded, so a 2-hour file costs what 30 s cost; compressed formats whose count is an
    estimate (MP3, Ogg Vorbis/Opus, and whatever ffmpeg decodes) are decoded to the end for their
    duration, keeping only the window in memory. Raises ``AudioDecodeError`` for a path that is not
    a regular file (a FIFO would block), unreadable, truncated (fewer frames than an exact header
    promises), in a format no installed decoder reads, empty or non-finite audio.
    """
    if isinstance(source, (str, os.PathLike)):
        _check_regular_file(source)
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        y, orig_sr, frames = _decode_with_soundfile(data, max_seconds)
    except AudioDecodeError:
        raise
    except Exception as sf_error:  # libsndfile could not read it: librosa's own fallback (audioread)
        y, orig_sr, frames = _decode_with_audioread(data, sf_error, max_seconds)
    if y.size == 0:
        raise AudioDecodeError("zero-length audio")
    if not np.isfinite(y).all():
        raise AudioDecodeError("audio holds NaN or inf samples")
    if orig_sr != sr:
        length = _librosa_length(len(y), orig_sr, sr)
        y = soxr.resample(y, orig_sr, sr, quality=RESAMPLE_QUALITY)
        if len(y) != length:  # librosa's fix_length: soxr's output zero-padded or cut to its own length
            y = np.pad(y[:length], (0, length - min(length, len(y))))
    seconds = _librosa_length(frames, orig_sr, sr) / sr  # the whole input's, as librosa.load returns it
    if max_seconds is not None:
        y = y[:math.ceil(max_seconds * sr) + 1]  # one sample more than kept marks the clip as cut
    return DecodedAudio(np.ascontiguousarray(y, dtype=np.float32), int(orig_sr), round(seconds, 6))


def _librosa_length(frames: int, orig_sr: int, sr: int) -> int:
    """Samples ``librosa.resample`` returns for ``frames`` at ``orig_sr`` (its float ratio, rounded up)."""
    return frames if orig_sr == sr else math.ceil(frames * (sr / orig_sr))


def _check_regular_file(path: str | os.PathLike) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise AudioDecodeError(f"cannot read audio file ({type(error).__name__}: {error.strerror})") from error
    if not stat.S_ISREG(mode):
        raise AudioDecodeError(f"not a regular file ({file_type(mode)})")


def _decode_with_soundfile(data, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """``(mono float32 at the file's rate, rate, the whole file's frames)``."""
    with soundfile.SoundFile(data) as f:
        # libsndfile quietly shortens a file cut after its header to what is there; its log keeps
        # the header's claim ("data : 32000 (should be 8000)" for WAV, SSND for AIFF).
        cut = TRUNCATED_LOG.search(f.extra_info)
        if cut and int(cut.group(2)) > int(cut.group(3)):
            raise AudioDecodeError(f"truncated audio: the header promises {cut.group(2)} bytes of samples, "
                                   f"the file holds {cut.group(3)}")
        total, orig_sr = f.frames, f.samplerate
        wanted = total if max_seconds is None else min(total, _window_frames(max_seconds, orig_sr))
        y = f.read(wanted, dtype="float32", always_2d=True)  # [samples, channels]
        if f.subtype in ESTIMATED_LENGTH_SUBTYPES:  # the samples decoded are the truth, not the header
            total = len(y) + _count_to_the_end(f)
        elif len(y) < wanted:
            raise AudioDecodeError(f"truncated audio: {total} frames expected, only {len(y)} could be read")
    # Channel mean as librosa's (channels summed in order, then divided), column by column: numpy's
    # mean over the short last axis of [samples, channels] is a strided reduction ~50x slower, and a
    # matmul wakes numpy's BLAS thread pool, whose idle threads then spin on the other cores.
    mono = y[:, 0]
    if y.shape[1] > 1:
        mono = mono.copy()
        for channel in range(1, y.shape[1]):
            mono += y[:, channel]
        mono /= y.shape[1]
    return mono, orig_sr, total


def _window_frames(max_seconds: float, sample_rate: int) -> int:
    return math.ceil((max_seconds + DECODE_MARGIN_SECONDS) * sample_rate)


def _count_to_the_end(f: soundfile.SoundFile) -> int:
    """Frames left in ``f``, decoded block by block and dropped. ``SoundFile.blocks`` is no use here:
    it trusts the header's count and pads a short read."""
    count = 0
    while block := len(f.read(COUNT_BLOCK_FRAMES, dtype="float32", always_2d=True)):
        count += block
    return count


def _decode_with_audioread(data, sf_error: Exception, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """librosa.load's fallback for what libsndfile cannot read: audioread (ffmpeg), whose 16-bit
    samples librosa scales and averages as here. Decoded to the end: the container's duration is an
    estimate too."""
    import audioread  # imported lazily: only files libsndfile rejects come here
    import librosa

    with contextlib.ExitStack() as stack:
        if isinstance(data, (str, os.PathLike)):
            path = os.path.abspath(data)  # never read by ffmpeg as an option or a protocol ("concat:...")
        else:  # bytes from a shard or a dataset: ffmpeg reads files
            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="decode-")), "audio")
            data.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(data, out)
        try:
            reader = stack.enter_context(audioread.audio_open(path))
            channels, orig_sr = reader.channels, reader.samplerate
            if channels < 1 or orig_sr < 1:  # ffmpeg guessed a container (text as FLAC) but found no audio in it
                raise audioread.NoBackendError()
            frame_bytes = 2 * channels  # audioread yields interleaved int16
            keep = sys.maxsize if max_seconds is None else _window_frames(max_seconds, orig_sr) * frame_bytes
            kept, size = [], 0
            for block in reader:
                if size < keep:
                    kept.append(block[:keep - size])
                size += len(block)
        except audioread.NoBackendError as error:
            raise AudioDecodeError(_no_decoder_reason(sf_error)) from error
        except audioread.DecodeError as error:
            raise AudioDecodeError(f"cannot decode audio: ffmpeg failed ({type(error).__name__}: {error})") from error
    y = librosa.util.buf_to_float(b"".join(kept), dtype=np.float32)
    if channels > 1:
        y = librosa.to_mono(y.reshape(-1, channels).T)
    return y, int(orig_sr), size // frame_bytes


def _no_decoder_reason(sf_error: Exception) -> str:
    sf_reason = getattr(sf_error, "error_string", None) or f"{type(sf_error).__name__}: {sf_error}"
    if shutil.which("ffmpeg") is None:
        return (f"cannot decode audio: libsndfile cannot read it ({sf_reason}) and ffmpeg, the decoder "
                f"for the rest (m4a/aac, webm, wma, ...), is not installed (scripts/install.sh installs it)")
    return f"cannot decode audio: neither libsndfile ({sf_reason}) nor ffmpeg reads it"


def valid_frames(num_samples: int) -> int:
    """Mel frames that see audio when ``num_samples`` are zero-padded to 30 s (centred STFT)."""
    return min(N_FRAMES, math.ceil((num_samples + N_FFT // 2) / HOP_LENGTH))


def _hz_to_mel(hz):
    """Slaney's mel scale (librosa's default, Whisper's): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), linear)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), mel * 200.0 / 3.0)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Whisper's Slaney-normalised mel filter bank, ``[n_mels, 1 + N_FFT // 2]`` float32: the same
    numbers as ``WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T`` (tested), computed here
    so a packing worker does not import transformers (about 1 s of start-up) for it."""
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, 1 + N_FFT // 2)  # [201]
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)  # [n_mels + 2]
    widths = np.diff(hz_edges)
    slopes = hz_edges[None, :] - fft_freqs[:, None]  # [201, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))  # triangles, [201, n_mels]
    filters *= 2.0 / (hz_edges[2:] - hz_edges[:-2])  # Slaney: each triangle has unit area
    filters = np.ascontiguousarray(filters.T, dtype=np.float32)
    filters.flags.writeable = False  # shared by every call (cached)
    return filters


# The periodic Hann window (the extractor's window_function(N_FFT, "hann")), computed in float64 and
# rounded to float32; torch.hann_window's float32 values differ from it in the last bit at most.
HANN_WINDOW = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
HANN_WINDOW.flags.writeable = False
_LOG10_E = np.float32(1.0 / np.log(10.0))  # log10(x) = ln(x) / ln(10): numpy's float32 log is SIMD, its log10 is not


@functools.lru_cache(maxsize=1)
def _blas():
    """numpy's BLAS libraries (threadpoolctl): the mel projection runs them on one thread, since its
    small products gain nothing from the pool, whose idle threads then spin on the other cores
    (several times the products' own CPU time)."""
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


MEL_ROW_GROUPS = 4  # filter bank row blocks: 4 do a quarter of the dense product's work


@functools.lru_cache(maxsize=4)
def _mel_blocks(n_mels: int) -> tuple[tuple[slice, slice, np.ndarray], ...]:
    """``mel_filters(n_mels)`` as ``(rows, columns, block)`` products over the interleaved
    (re, im) float32 view of the spectrum: each block holds a group of filters over the columns
    their triangles cover (Slaney triangles are narrow: the dense product is mostly zeros), every
    weight twice, for the real and the imaginary part, so the product of the squared view sums
    re^2 + im^2 itself (no separate power pass over strided halves of a complex array)."""
    filters = mel_filters(n_mels)
    nonzero = filters != 0
    first = nonzero.argmax(1)
    end = filters.shape[1] - nonzero[:, ::-1].argmax(1)
    bounds = np.linspace(0, n_mels, MEL_ROW_GROUPS + 1).astype(int)
    blocks = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        c0, c1 = int(first[r0:r1].min()), int(end[r0:r1].max())
        block = np.repeat(filters[r0:r1, c0:c1], 2, axis=1)  # [rows, 2 * columns]: re, im, re, im, ...
        block.flags.writeable = False
        blocks.append((slice(r0, r1), slice(2 * c0, 2 * c1), block))
    return tuple(blocks)


def log_mel(audio: np.ndarray, n_mels: int = 80) -> tuple[np.ndarray, float]:
    """Whisper log-mel of 16-kHz mono ``audio`` on its valid frames only.

    Returns ``(mel [n_mels, valid_frames] float32, pad_value)``: padding ``mel`` to ``N_FRAMES`` with
    ``pad_value`` gives ``WhisperFeatureExtractor(feature_size=n_mels)(audio)`` for the (at most 30 s
    of) audio, within float32 rounding. Longer audio is cut to 30 s first, as the extractor does.
    """
    audio = audio[:N_SAMPLES]
    n = len(audio)
    if n == 0:
        raise AudioDecodeError("zero-length audio")
    frames = valid_frames(n)
    # Zero-extend far enough that the STFT's right-edge reflection only mirrors zeros (it does in
    # the extractor's 30-s padded input too), but never past the 30-s edge, where the extractor
    # reflects real samples.
    length = min(N_SAMPLES, max(n + N_FFT // 2 + 1, (frames - 1) * HOP_LENGTH + N_FFT // 2 + 1))
    # The centred STFT of those samples: reflect padding, Hann-windowed frames, one-sided FFT.
    pad = N_FFT // 2
    padded = np.zeros(length + 2 * pad, dtype=np.float32)
    padded[pad:pad + n] = audio
    padded[:pad] = padded[2 * pad:pad:-1]  # reflect: padded[pad - k] = padded[pad + k]
    padded[pad + length:] = padded[pad + length - 2:length - 2:-1]
    windows = np.lib.stride_tricks.as_strided(padded, (frames, N_FFT), (HOP_LENGTH * padded.itemsize,
                                                                        padded.itemsize), writeable=False)
    spectrum = scipy.fft.rfft(windows * HANN_WINDOW, axis=-1)  # [frames, 201] complex64
    squares = np.square(spectrum.view(np.float32), out=spectrum.view(np.float32)).T  # [402, frames]: re^2, im^2, ...
    log_spec = np.empty((n_mels, frames), dtype=np.float32)
    with _blas().limit(limits=1):
        for rows, columns, block in _mel_blocks(n_mels):  # |z|^2 projected: re^2 + im^2 summed by the product
            np.matmul(block, squares[columns], out=log_spec[rows])
    np.maximum(log_spec, 1e-10, out=log_spec)
    np.log(log_spec, out=log_spec)
    log_spec *= _LOG10_E
    peak = float(log_spec.max())
    if frames < N_FRAMES:  # the all-zero padding frames take part in the extractor's max
        peak = max(peak, LOG_FLOOR)
    floor = peak - DYNAMIC_RANGE
    np.maximum(log_spec, floor, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    pad_value = (max(LOG_FLOOR, floor) + 4.0) / 4.0
    return log_spec, float(pad_value)


_F32_MIN_NORMAL_F16 = np.uint32(113 << 23)  # float32 bits of 2**-14, the smallest normal float16
_F32_ROUNDS_TO_INF = np.uint32(0x477FF000)  # float32 bits of 65520, the first value float16 rounds to inf


def to_float16(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float16)`` for float32 ``x`` (other dtypes pass through float32 first): the same
    bits (round to nearest even; tested against numpy) in about half the time. numpy converts element
    by element here; this shifts the float32 bits in a few integer passes and leaves numpy's own cast
    the few values whose float16 is not a normal number (subnormal, zero, overflow, NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    # drop 13 mantissa bits rounding to nearest even (a carry moves into the exponent, as it should),
    # then rebias the exponent from 127 to 15
    half = (magnitude + np.uint32(0x0FFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    half -= np.uint32((127 - 15) << 10)
    out = half.astype(np.uint16)
    out |= (bits >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    out = out.view(np.float16).reshape(np.shape(x))
    odd = np.flatnonzero((magnitude < _F32_MIN_NORMAL_F16) | (magnitude >= _F32_ROUNDS_TO_INF))
    if odd.size:
        with np.errstate(over="ignore"):
            out.flat[odd] = np.asarray(x, dtype=np.float32).flat[odd].astype(np.float16)
    return out


def pad_mel(mel, pad_value: float, n_frames: int = N_FRAMES):
    """Pad ``mel [n_mels, frames]`` (a numpy array or a torch tensor) on the right to ``n_frames``
    with ``pad_value`` (the extractor's output for the silent rest of the 30-s window)."""
    frames = mel.shape[-1]
    if frames > n_frames:
        raise ValueError(f"mel has {frames} frames, more than the {n_frames} Whisper takes")
    if isinstance(mel, np.ndarray):
        out = np.full((*mel.shape[:-1], n_frames), pad_value, dtype=mel.dtype)
    else:  # a tensor: this module leaves torch unimported (packing workers start faster without it)
        out = mel.new_full((*mel.shape[:-1], n_frames), pad_value)
    out[..., :frames] = mel
    return out


def clip_features(audio: np.ndarray, n_mels: int = 80, seconds: float | None = None) -> dict:
    """Everything a shard stores about one decoded 16-kHz clip, except captions and source fields;
    ``seconds`` is the input's whole duration when ``audio`` holds only its start.

    Raises ``AudioDecodeError`` for empty or silent clips (a log-mel of pure silence is a constant the
    model cannot caption, and it nearly always means a broken file) and for samples so large that
    their power overflows (a log-mel of NaN).
    """
    if len(audio) == 0:
        raise AudioDecodeError("zero-length audio")
    head = audio[:N_SAMPLES]
    if not np.any(head):
        raise AudioDecodeError("silent audio (every sample is zero)")
    mel, pad_value = log_mel(head, n_mels)
    if not (np.isfinite(mel).all() and math.isfinite(pad_value)):
        raise AudioDecodeError(f"the log-mel is not finite: sample values up to {float(np.abs(head).max()):.3g} "
                               f"overflow the power spectrum (audio should lie within [-1, 1])")
    return {
        "mel": to_float16(mel),  # [n_mels, valid_frames]
        "pad_value": pad_value,
        "seconds": round(len(audio) / SAMPLE_RATE, 6) if seconds is None else seconds,
        "truncated": len(audio) > N_SAMPLES,
    }
