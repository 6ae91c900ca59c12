"""The shard format of docs/FORMAT.md in code: the one contract between the packer (``shard_tools``)
and the loader (``shard_tools.urls``, ``shard_tools.tar``, ``pipeline.stream``). Both ends import
what is here and nothing else about the format; ``encode_sample`` / ``decode_sample`` and
``Index.to_dict`` / ``parse_index`` apply the same checks. numpy only. docs/FORMAT.md stays the
human spec.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

# Whisper's fixed audio front end (openai/whisper audio.py).
SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window at 16 kHz
HOP_LENGTH = 160  # 10 ms hop at 16 kHz
CHUNK_LENGTH = 30  # seconds: the encoder's fixed input window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480,000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames the encoder expects
MAX_TARGET_POSITIONS = 448  # Whisper's decoder positions: the longest label sequence a model takes
N_MELS = (80, 128)  # mel bins of every Whisper model (128: large-v3)

FORMAT_NAME = "whisper-caption-stream"
FORMAT_VERSION = 1  # the version this release writes
# The versions this release reads (FORMAT_VERSION among them); an index of any other is refused, naming
# them, rather than misread. A new version that old shards still satisfy adds itself here.
READABLE_VERSIONS = (1,)
INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
MEL_MEMBER = "mel.npy"  # member extensions: KEY.mel.npy and KEY.json
META_MEMBER = "json"
MEL_DTYPE = np.float16
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: anything larger is inf in a float16 batch
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# The smallest sample a tar can hold: two members, each a header block and one data block. It bounds
# the sample count an index entry may claim for a shard of a given size.
MIN_SAMPLE_BYTES = 4 * 512
# Each index entry may carry the KEY_SKETCH_SIZE smallest 64-bit hashes of its shard's keys (a bottom-k
# MinHash sketch): enough to estimate, from the indexes alone, how many keys two shards of any sharding
# share, at 16 hex digits per hash.
KEY_SKETCH_SIZE = 32
# JSON deeper than this (captions, extra fields) is refused: Python's parser and encoder recurse, and
# no caption or metadata needs more than a few levels.
MAX_JSON_DEPTH = 32

# The one list of audio file suffixes: folder inputs, raw-audio shard members and infer_stream --audio.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".aif", ".aiff", ".m4a", ".aac",
                            ".wma", ".webm"})


class SampleError(ValueError):
    """One sample that does not follow the format; the message names the sample and the reason."""


def feature_settings(n_mels: int) -> dict:
    """The ``features`` block of ``index.json``."""
    return {"kind": "whisper-log-mel", "n_mels": n_mels, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT,
            "hop_length": HOP_LENGTH, "dtype": np.dtype(MEL_DTYPE).name}


# ------------------------------------------------------------------------------------------ text and JSON

def check_text(text: str, what: str) -> str:
    """``text`` if it can be written as UTF-8; ValueError otherwise (a lone surrogate, as scraped
    emoji halves leave, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.end].encode("utf-8", "surrogatepass").hex()
        raise ValueError(f"{what} is not valid Unicode (lone surrogate 0x{bad} at {error.start})") from None
    return text


def json_depth(obj: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), counted without recursion."""
    depth, level = 0, [obj]
    while containers := [o for o in level if isinstance(o, (dict, list))]:
        depth += 1
        level = [v for o in containers for v in (o.values() if isinstance(o, dict) else o)]
    return depth


def load_json(data: bytes | str, what: str = "JSON") -> Any:
    """Parse JSON text (a UTF-8 BOM is dropped); ValueError naming ``what`` for text that is not
    UTF-8 JSON, holds a lone surrogate or nests deeper than ``MAX_JSON_DEPTH``."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, (bytes, bytearray)) else data.removeprefix("\ufeff")
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"invalid {what} ({error})") from error
    check_json(obj, what)
    return obj


def check_json(obj: Any, what: str) -> str:
    """``obj`` as JSON text (non-ASCII kept); ValueError when it nests too deeply or holds a string
    that is not valid Unicode."""
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return check_text(json.dumps(obj, ensure_ascii=False), what)


def json_line(obj: Any) -> str:
    """One JSONL line that any string survives (non-ASCII escaped, so lone surrogates too)."""
    return json.dumps(obj, ensure_ascii=True) + "\n"


# ------------------------------------------------------------------------------------------ dataclasses

@dataclass(frozen=True)
class SampleMeta:
    """``KEY.json``: what a shard stores about one clip besides its log-mel (FORMAT.md)."""

    captions: list[str]
    source: str
    seconds: float
    orig_sample_rate: int
    pad_value: float
    truncated: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The member's UTF-8 JSON, serialised once; ValueError for metadata the loader would refuse."""
        if not (isinstance(self.captions, list) and self.captions
                and all(isinstance(c, str) and c.strip() for c in self.captions)):
            raise ValueError("'captions' must be a non-empty list of non-empty strings")
        check_pad_value(self.pad_value)
        if not isinstance(self.extra, dict):
            raise ValueError("'extra' must be a JSON object")
        return check_json(asdict(self), "the sample's JSON").encode("utf-8")


def check_pad_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > FLOAT16_MAX:
        raise ValueError(f"'pad_value' must be a finite number within float16 range, got {value!r}")
    return float(value)


def key_hash(key: str) -> int:
    """A sample key's 64-bit hash, the same in the packer and in a reader's header scan."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def key_sketch(keys: Iterable[str]) -> tuple[int, ...]:
    """The ``KEY_SKETCH_SIZE`` smallest hashes of distinct ``keys``, ascending: a shard's key sketch."""
    return tuple(heapq.nsmallest(KEY_SKETCH_SIZE, {key_hash(k) for k in keys}))


def _parse_sketch(value: Any, samples: int) -> tuple[int, ...] | None:
    """An entry's ``key_sketch`` (optional: indexes written before it have none); ValueError if malformed."""
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{16}", h) for h in value)):
        raise ValueError("key_sketch must be a list of 16-digit lowercase hex strings")
    sketch = tuple(int(h, 16) for h in value)
    if list(sketch) != sorted(set(sketch)) or len(sketch) != min(samples, KEY_SKETCH_SIZE):
        raise ValueError(f"key_sketch must hold min(samples, {KEY_SKETCH_SIZE}) distinct hashes, ascending")
    return sketch


def _brief(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: an index may hold any amount in one entry, and an
    error must stay one line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class IndexEntry:
    """One shard of ``index.json``; ``name`` is relative to the folder holding the index;
    ``key_sketch`` (see ``key_sketch``) is None in indexes written before it existed."""

    name: str
    samples: int
    seconds: float
    bytes: int
    sha256: str
    key_sketch: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, entry: Any, where: str) -> IndexEntry:
        """Checked: ValueError naming ``where`` for a malformed entry or one that claims more
        samples than its byte size can hold (an index that would plan reads of nothing). Other
        fields (the packer's progress entries hold more) are ignored."""
        try:
            samples = int(entry["samples"])
            made = cls(str(entry["name"]), samples, float(entry["seconds"]), int(entry["bytes"]),
                       str(entry["sha256"]), _parse_sketch(entry.get("key_sketch"), samples))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: bad shard entry {_brief(entry)} ({type(error).__name__}: {error})") from None
        if made.samples < 0 or made.bytes < 0 or made.samples * MIN_SAMPLE_BYTES > made.bytes:
            raise ValueError(f"{where}: shard {made.name} claims {made.samples} samples in {made.bytes} bytes "
                             f"(a sample takes at least {MIN_SAMPLE_BYTES})")
        return made

    def to_dict(self) -> dict:
        """The entry as ``index.json`` holds it (no ``key_sketch`` when there is none)."""
        entry = {"name": self.name, "samples": self.samples, "seconds": self.seconds, "bytes": self.bytes,
                 "sha256": self.sha256}
        if self.key_sketch is not None:
            entry["key_sketch"] = [f"{h:016x}" for h in self.key_sketch]
        return entry


@dataclass(frozen=True)
class Reject:
    """An input that was not packed: its source, output split, the reason, and (once the packer has
    seen it) its position among the split's inputs."""

    source: str
    split: str
    reason: str
    input: int | None = None

    def line(self) -> str:
        """Its ``rejects.jsonl`` line."""
        return json_line({"path": self.source, "reason": self.reason})


@dataclass(frozen=True)
class Index:
    """``index.json`` of one split: its shards, the mel bins, the totals its entries do not hold
    (inputs truncated to the 30-s window, inputs rejected), and the format version it was written in
    (one of ``READABLE_VERSIONS``; an index without one is taken as ``FORMAT_VERSION``)."""

    split: str | None
    n_mels: int | None
    entries: list[IndexEntry]
    truncated: int = 0
    rejected: int = 0
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """The index as ``index.json`` holds it: settings, one entry per shard, totals."""
        entries = self.entries
        totals = {"shards": len(entries), "samples": sum(e.samples for e in entries),
                  "seconds": round(sum(e.seconds for e in entries), 6), "bytes": sum(e.bytes for e in entries),
                  "truncated": self.truncated, "rejected": self.rejected}
        return {"format": FORMAT_NAME, "version": self.version, "split": self.split,
                "features": feature_settings(self.n_mels), "shards": [e.to_dict() for e in entries], "totals": totals}

    @classmethod
    def from_dict(cls, index: Any, where: str) -> Index:
        """Checked: ValueError naming ``where`` for anything that is not an index this release reads."""
        if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
            raise ValueError(f"{where}: not a valid index.json (no 'shards' list)")
        if index.get("format") not in (None, FORMAT_NAME):
            raise ValueError(f"{where}: format {_brief(index['format'])}, this release reads {FORMAT_NAME}")
        version = index.get("version", FORMAT_VERSION)
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(f"{where}: {FORMAT_NAME} version {_brief(version)}, this release reads version(s) "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        entries = [IndexEntry.from_dict(e, where) for e in index["shards"]]
        if len({e.name for e in entries}) != len(entries):
            raise ValueError(f"{where}: a shard is listed more than once")
        features, totals = index.get("features"), _field(where, "totals", index.get("totals", {}), dict)
        n_mels = features.get("n_mels") if isinstance(features, dict) else None
        return cls(_field(where, "split", index.get("split"), str, optional=True),
                   _field(where, "n_mels", n_mels, int, optional=True), entries,
                   _field(where, "truncated", totals.get("truncated", 0), int),
                   _field(where, "rejected", totals.get("rejected", 0), int), version)


def _field(where: str, name: str, value: Any, kind: type, optional: bool = False) -> Any:
    """``value`` of an index field if it is a ``kind`` (or None where ``optional``); ValueError naming
    the index otherwise."""
    if type(value) is kind or (optional and value is None):
        return value
    raise ValueError(f"{where}: '{name}' is {_brief(value)}, expected {kind.__name__}")


def parse_index(data: bytes, where: str) -> Index:
    """The ``Index`` of ``index.json`` text; ValueError naming ``where`` if it is not one this release reads."""
    return Index.from_dict(load_json(data, where), where)


# ------------------------------------------------------------------------------------------ samples

def encode_sample(key: str, mel: np.ndarray, meta: SampleMeta) -> list[tuple[str, bytes]]:
    """The two members of one sample, ``(name, bytes)``, after the checks ``decode_sample`` makes;
    ``SampleError`` with the reason otherwise."""
    try:
        if not KEY_RE.match(key):
            raise ValueError(f"key {key!r} has characters outside [A-Za-z0-9_-]")
        stored = _check_mel(np.asarray(mel), None)
        meta_json = meta.to_json()
    except ValueError as error:
        raise SampleError(str(error)) from None
    return [(f"{key}.{MEL_MEMBER}", _npy_header(stored.shape) + stored.tobytes()), (f"{key}.{META_MEMBER}", meta_json)]


@functools.lru_cache(maxsize=2 * N_FRAMES)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered ``MEL_DTYPE`` array of ``shape`` (one
    per frame count: building it costs more than copying the data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(MEL_DTYPE)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def decode_sample(raw: dict, n_mels: int | None = None) -> dict:
    """Raw tar members ``{"__key__", "__url__", "mel.npy": bytes, "json": bytes}`` ->
    ``{"__key__", "__url__", "mel": float16 [n_mels, frames], "json": dict}``; ``SampleError`` naming
    URL and key for anything that does not follow the format. Never unpickles."""
    where = f"{raw.get('__url__')}: sample '{raw.get('__key__')}'"
    missing = [m for m in (MEL_MEMBER, META_MEMBER) if m not in raw]
    if missing:
        raise SampleError(f"{where} lacks member(s) {missing}")
    try:
        meta = load_json(raw[META_MEMBER], "json")
        if not isinstance(meta, dict):
            raise ValueError("json is not an object")
        captions = meta.get("captions")
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError("json needs 'captions', a non-empty list of non-empty strings")
        meta["pad_value"] = check_pad_value(meta.get("pad_value"))
        try:
            mel = np.load(io.BytesIO(raw[MEL_MEMBER]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"mel.npy is not a plain .npy array ({error})") from error
        mel = _check_mel(mel, n_mels)
    except ValueError as error:
        raise SampleError(f"{where}: {error}") from None
    return {"__key__": raw["__key__"], "__url__": raw["__url__"], "mel": mel, "json": meta}


def _check_mel(mel: np.ndarray, n_mels: int | None) -> np.ndarray:
    """``mel`` as stored and batched (float16), checked after the cast: a float32 value past 65504
    is finite before it and inf after."""
    if mel.ndim != 2 or mel.dtype.kind != "f" or not 1 <= mel.shape[1] <= N_FRAMES:
        raise ValueError(f"mel.npy is {mel.dtype} {mel.shape}, expected float16 [n_mels, 1..{N_FRAMES}]")
    if n_mels is not None and mel.shape[0] != n_mels:
        raise ValueError(f"mel.npy has {mel.shape[0]} mel bins, the split has {n_mels}")
    with np.errstate(over="ignore"):
        stored = np.ascontiguousarray(mel, dtype=MEL_DTYPE)
    # exponent bits all set = inf or NaN; 10x faster than float16 isfinite
    if ((stored.view(np.uint16) & 0x7C00) == 0x7C00).any():
        raise ValueError("mel.npy holds NaN or inf (as float16)")
    return stored
