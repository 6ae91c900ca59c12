"""Model and processor loading: a Hub id, a local checkpoint folder, or the built-in ``tiny``.

``tiny`` is a small Whisper built from ``WhisperConfig`` with random weights and the **real**
multilingual Whisper tokenizer, built offline from ``assets/multilingual.tiktoken`` (shipped in
openai-whisper, MIT licence beside it). It makes tests and the demo run with no network while taking
the same code path as ``openai/whisper-small``: same token ids, same prompt, same generation config.

The captioning task is Whisper's ``translate`` task in English: the decoder reads
``<|startoftranscript|><|en|><|translate|><|notimestamps|> caption <|endoftext|>``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

BUILTIN_TINY = "tiny"
LANGUAGE = "en"
TASK = "translate"
ASSETS = Path(__file__).resolve().parent / "assets"
TIKTOKEN_FILE = ASSETS / "multilingual.tiktoken"
TIKTOKEN_SHA256 = "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126"

# openai/whisper tokenizer.py: the GPT-2 pre-tokenizer split and the special tokens that follow the
# 50,257 BPE ranks, in id order. v1/v2 checkpoints (tiny … large-v2) know 99 languages.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NUM_LANGUAGES = 99
NUM_TIMESTAMPS = 1501  # <|0.00|> … <|30.00|> in 20-ms steps

# The built-in model: d_model 64, 2 + 2 layers, 4 heads (3.7 M parameters, most in the embedding).
TINY_CONFIG = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                   max_source_positions=1500, max_target_positions=448, num_mel_bins=80)


class ModelLoadError(RuntimeError):
    """A model name that resolves to nothing loadable; the message lists the alternatives."""


def _special_tokens() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    languages = list(LANGUAGES)[:NUM_LANGUAGES]
    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in languages]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)])


def _cache_dir() -> Path:
    root = os.environ.get("WCS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper-caption-stream")
    return Path(root)


def builtin_tokenizer_file() -> Path:
    """``tokenizer.json`` of the real multilingual Whisper tokenizer, built once and cached (~1.5 s)."""
    target = _cache_dir() / f"whisper-multilingual-{TIKTOKEN_SHA256[:12]}" / "tokenizer.json"
    if target.exists():
        return target
    digest = hashlib.sha256(TIKTOKEN_FILE.read_bytes()).hexdigest()
    if digest != TIKTOKEN_SHA256:
        raise ModelLoadError(f"{TIKTOKEN_FILE} is damaged (sha256 {digest}, expected {TIKTOKEN_SHA256})")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(TIKTOKEN_FILE), pattern=SPLIT_PATTERN,
                                extra_special_tokens=_special_tokens()).converted()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    backend.save(tmp)
    os.replace(tmp, target)  # atomic: concurrent ranks or workers never read half a file
    return target


def builtin_tokenizer() -> WhisperTokenizer:
    eot = "<|endoftext|>"
    return WhisperTokenizer(tokenizer_file=str(builtin_tokenizer_file()), language=LANGUAGE, task=TASK,
                            predict_timestamps=False, unk_token=eot, bos_token=eot, eos_token=eot,
                            pad_token=eot, model_max_length=448)


def caption_generation_config(tokenizer: WhisperTokenizer, base: GenerationConfig | None = None) -> GenerationConfig:
    """Generation settings for captioning: English ``translate``, no timestamps, and no
    ``forced_decoder_ids`` (language and task go to ``generate`` as arguments instead)."""
    gen = base or GenerationConfig()
    tid = tokenizer.convert_tokens_to_ids
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    gen.decoder_start_token_id = tid("<|startoftranscript|>")
    gen.bos_token_id = gen.eos_token_id = gen.pad_token_id = tid("<|endoftext|>")
    gen.begin_suppress_tokens = [220, tid("<|endoftext|>")]  # a leading space or an empty caption
    gen.no_timestamps_token_id = tid("<|notimestamps|>")
    gen.lang_to_id = {f"<|{code}|>": tid(f"<|{code}|>") for code in list(LANGUAGES)[:NUM_LANGUAGES]}
    gen.task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
    gen.is_multilingual = True
    gen.language, gen.task = LANGUAGE, TASK
    gen.return_timestamps = False
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json and drops the above
    gen.max_length = 448
    return gen


def builtin_tiny_model(tokenizer: WhisperTokenizer, n_mels: int = 80, seed: int = 0) -> WhisperForConditionalGeneration:
    import torch

    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")
    config = WhisperConfig(vocab_size=len(tokenizer), **{**TINY_CONFIG, "num_mel_bins": n_mels},
                           decoder_start_token_id=tid("<|startoftranscript|>"), pad_token_id=eot,
                           bos_token_id=eot, eos_token_id=eot)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random weights on every rank and every run
        model = WhisperForConditionalGeneration(config)
    model.generation_config = caption_generation_config(tokenizer, model.generation_config)
    return model


def load_processor(name: str) -> WhisperProcessor:
    """Feature extractor + tokenizer for ``name`` (``tiny``, a local folder or a Hub id)."""
    if name == BUILTIN_TINY:
        return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=TINY_CONFIG["num_mel_bins"]),
                                tokenizer=builtin_tokenizer())
    processor = _from_pretrained(WhisperProcessor, name)
    processor.tokenizer.set_prefix_tokens(language=LANGUAGE, task=TASK, predict_timestamps=False)
    return processor


def load_model(name: str, processor: WhisperProcessor | None = None, **kwargs) -> WhisperForConditionalGeneration:
    """Model for ``name``; ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    processor = processor or load_processor(name)
    if name == BUILTIN_TINY:
        model = builtin_tiny_model(processor.tokenizer, n_mels=processor.feature_extractor.feature_size)
        if "attn_implementation" in kwargs:
            model.set_attn_implementation(kwargs["attn_implementation"])
        return model
    model = _from_pretrained(WhisperForConditionalGeneration, name, **kwargs)
    model.generation_config = caption_generation_config(processor.tokenizer, model.generation_config)
    return model


def _from_pretrained(cls, name: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        where = ("the local folder" if os.path.isdir(name) else
                 "the Hugging Face Hub (no network here, or the id is wrong?)")
        raise ModelLoadError(
            f"cannot load {cls.__name__} '{name}' from {where}: {error}\n"
            f"Use model_config.name={BUILTIN_TINY} for the built-in offline model, a local checkpoint "
            f"folder (e.g. outputs/run/final), or a Hub id that is already in the Hugging Face cache "
            f"(then set HF_HUB_OFFLINE=1).") from error


def save_model(model, processor: WhisperProcessor, directory: str | os.PathLike) -> None:
    """``save_pretrained`` model + processor so that ``from_pretrained`` loads both back."""
    model.generation_config = caption_generation_config(processor.tokenizer, model.generation_config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
