"""Model and processor loading: a Hub id, a local checkpoint folder, or the built-in ``tiny``.

``tiny`` is a small Whisper built from ``WhisperConfig`` with random weights and the **real**
multilingual Whisper tokenizer, built offline from ``assets/multilingual.tiktoken`` (shipped in
openai-whisper, MIT licence beside it). It makes tests and the demo run with no network while taking
the same code path as ``openai/whisper-small``: same token ids, same prompt, same generation config.

The captioning task is Whisper's ``translate`` task in English: the decoder reads
``<|startoftranscript|><|en|><|translate|><|notimestamps|> caption <|endoftext|>``.
``fit_encoder`` lets the encoder take windows shorter than 30 s (``pipeline.window``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from pipeline.config import DECODE_METHODS
from pipeline.window import FRAMES_PER_POSITION, AudioWindow
from shard_tools.shard_format import MAX_TARGET_POSITIONS

log = logging.getLogger(__name__)
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
CAPTION_TOKENS_KEY = "caption_tokens_longest"  # generation config: the longest training caption, in tokens
# A checkpoint folder's tokenizer: either set is enough for WhisperTokenizer.from_pretrained
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

# The built-in model: d_model 64, 2 + 2 layers, 4 heads (3.7 M parameters, most in the embedding).
TINY_CONFIG = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                   max_source_positions=1500, max_target_positions=MAX_TARGET_POSITIONS, num_mel_bins=80)


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
                            pad_token=eot, model_max_length=MAX_TARGET_POSITIONS)


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
    # Captions carry no timestamps; one emitted anyway (an undertrained model does) would make HF
    # generate end the segment there and decode another 30-s window, past max_new_tokens.
    timestamps = range(tid("<|0.00|>"), tid("<|0.00|>") + NUM_TIMESTAMPS)
    gen.suppress_tokens = sorted(set(gen.suppress_tokens or ()) | set(timestamps))
    gen.lang_to_id = {f"<|{code}|>": tid(f"<|{code}|>") for code in list(LANGUAGES)[:NUM_LANGUAGES]}
    gen.task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
    gen.is_multilingual = True
    gen.language, gen.task = LANGUAGE, TASK
    gen.return_timestamps = False
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json and drops the above
    gen.max_length, gen.max_new_tokens = MAX_TARGET_POSITIONS, None
    return gen


def generate_captions(model, features, num_beams: int = 1, max_new_tokens: int | None = None,
                      prefix_ids: Sequence[int] = (), method: str = "static"):
    """Caption token ids ``[B, T]`` for log-mel ``features [B, n_mels, frames]``: greedy, or beam
    search with ``num_beams`` > 1; the prompt and ``prefix_ids`` (decoder tokens forced after
    ``<|startoftranscript|><|en|><|translate|><|notimestamps|>``, the same for every clip;
    ``pipeline.collate.prompt_ids``) stripped, the end token cut, rows padded with the pad token.
    ``max_new_tokens``: caption tokens at most (default: the generation config's ``max_length``,
    capped by the decoder's positions).
    ``method``: ``static`` (``pipeline.decode``) or ``hf`` (``model.generate``, the reference it equals).
    The HF call carries its own generation config and the encoder's attention mask (every frame is
    real: features are padded as Whisper's 30-s window), so ``generate`` has nothing to warn about;
    a shorter window goes to it as the encoder's output, since ``generate`` pads features to 30 s
    with zeros."""
    import torch

    from pipeline import decode

    if method == "static":
        rules = decode.decode_rules(model.generation_config, LANGUAGE, TASK, prefix_ids)
        return decode.generate(model, features, rules, decode.max_new_tokens_for(model, rules, max_new_tokens),
                               num_beams)
    if method != "hf":
        raise ValueError(f"decoding method {method!r}: choose from {', '.join(DECODE_METHODS)}")
    gen = copy.deepcopy(model.generation_config)
    gen.do_sample, gen.num_beams = False, num_beams
    prompt = decode.task_prompt(gen, LANGUAGE, TASK, prefix_ids)
    if max_new_tokens:
        # Whisper's generate reads a max_length without max_new_tokens as new tokens after at most
        # max_target_positions // 2 - 1 of the prompt's (generation_whisper.py), and warns at every
        # call where both are set (its own defaults set max_length): a long prefix's excess is added
        gen.max_length = max_new_tokens + max(0, len(prompt) - (model.config.max_target_positions // 2 - 1))
    mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=features.device)  # [B, frames]
    extra = {}
    if prefix_ids:
        # the prompt Whisper would build, then the prefix; generate starts its caption (and the
        # begin suppression) after them and strips them from its output
        extra["decoder_input_ids"] = torch.tensor(prompt, device=features.device).expand(features.shape[0], -1)
    if features.shape[-1] < model.config.max_source_positions * FRAMES_PER_POSITION:
        extra["encoder_outputs"] = model.get_encoder()(features)
        return model.generate(generation_config=gen, language=LANGUAGE, task=TASK, **extra)
    return model.generate(input_features=features, attention_mask=mask, generation_config=gen,
                          language=LANGUAGE, task=TASK, **extra)


class _WhisperOwnArguments(logging.Filter):
    """Drops the one warning Whisper's ``generate`` causes itself, whatever its caller passes: it
    hands ``generate`` a generation config together with ``suppress_tokens`` and
    ``begin_suppress_tokens`` (transformers 5.24, generation_whisper.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = re.search(r"together with generation-related arguments=\((\{.*?\})\)", message)
        return not (found and set(re.findall(r"'(\w+)'", found.group(1))) <= {"suppress_tokens", "begin_suppress_tokens"})


logging.getLogger("transformers.generation.utils").addFilter(_WhisperOwnArguments())


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


def load_processor(name: str, option: str = "model_config.name") -> WhisperProcessor:
    """Feature extractor + tokenizer for ``name`` (``tiny``, a local folder or a Hub id); ``option``
    is the setting that named it, for the error message."""
    if name == BUILTIN_TINY:
        return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=TINY_CONFIG["num_mel_bins"]),
                                tokenizer=builtin_tokenizer())
    if os.path.isdir(name) and not any(all(os.path.isfile(os.path.join(name, f)) for f in files)
                                       for files in TOKENIZER_FILES):
        # from_pretrained would load an empty vocabulary without a word and fail later, deep in a traceback
        raise ModelLoadError(f"{option}: {name} has no tokenizer files ("
                             f"{' or '.join(' and '.join(files) for files in TOKENIZER_FILES)}); copy them from "
                             f"the model it was trained from, or save it with pipeline.model.save_model")
    processor = _from_pretrained(WhisperProcessor, name, option)
    processor.tokenizer.set_prefix_tokens(language=LANGUAGE, task=TASK, predict_timestamps=False)
    return processor


def load_model(name: str, processor: WhisperProcessor | None = None, option: str = "model_config.name",
               **kwargs) -> WhisperForConditionalGeneration:
    """Model for ``name``, its encoder fitted (``fit_encoder``: on a full window it is HF's);
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    processor = processor or load_processor(name, option)
    if name == BUILTIN_TINY:
        model = builtin_tiny_model(processor.tokenizer, n_mels=processor.feature_extractor.feature_size)
        if "attn_implementation" in kwargs:
            model.set_attn_implementation(kwargs["attn_implementation"])
        return fit_encoder(model)
    model = _from_pretrained(WhisperForConditionalGeneration, name, option, **kwargs)
    model.generation_config = caption_generation_config(processor.tokenizer, model.generation_config)
    return fit_encoder(model)


def _way_out(option: str) -> str:
    tiny = f"{option} {BUILTIN_TINY}" if option.startswith("-") else f"{option}={BUILTIN_TINY}"
    return (f"use {tiny} (built in, offline), a local checkpoint folder (e.g. outputs/whisper-caption/final), "
            f"or a Hub id already in the Hugging Face cache with HF_HUB_OFFLINE=1")


def resolve_source(name: str, option: str) -> dict:
    """The ``from_pretrained`` options that load ``name`` without a futile wait: a local folder is read
    as one; a missing path says so; a Hub id is checked with one quick request, and read from the cache
    alone when the Hub cannot be reached. ``ModelLoadError`` with the way out otherwise."""
    from pipeline import hub

    first = name.split("/")[0]
    if os.path.isdir(name):
        return {"local_files_only": True}
    if os.path.exists(name):
        raise ModelLoadError(f"{option}: {name} is a file, not a checkpoint folder; {_way_out(option)}")
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or (name.count("/") == 1 and os.path.isdir(first)):
        raise ModelLoadError(f"{option}: no such folder {name}; {_way_out(option)}")
    if hub.offline():
        if hub.cached(name):
            return {"local_files_only": True}
        raise ModelLoadError(f"{option}: '{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"{_way_out(option)}")
    try:
        hub.check_model(name)
    except hub.HubError as error:
        if hub.cached(name) and "cannot be reached" in str(error):
            log.warning("%s; loading '%s' from the Hugging Face cache", error, name)
            return {"local_files_only": True}
        raise ModelLoadError(f"{option}: cannot load '{name}': {error}; {_way_out(option)}") from None
    return {}


def _from_pretrained(cls, name: str, option: str, **kwargs):
    source = resolve_source(name, option)
    try:
        return cls.from_pretrained(name, **source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{option}: cannot load {cls.__name__} '{name}' ({str(error).splitlines()[0]}); "
                             f"{_way_out(option)}") from error


def save_model(model, processor: WhisperProcessor, directory: str | os.PathLike,
               prefixes: Sequence[tuple[str, str]] = (), caption_tokens: int | None = None,
               window: AudioWindow = AudioWindow()) -> None:
    """``save_pretrained`` model + processor so that ``from_pretrained`` loads both back; ``prefixes``
    (source name, caption prefix), the one inference uses by default first, are recorded in the generation config
    (``recorded_prefixes``), so inference prompts as training did without being told; so is
    ``caption_tokens``, the longest caption trained on in tokens, the end token included
    (``recorded_caption_tokens``; None or 0: not known, nothing recorded, and a record the model
    came with is dropped: it described other data); so is the encoder ``window`` trained with
    (``recorded_window``), which inference then uses unless told otherwise."""
    gen = model.generation_config = caption_generation_config(processor.tokenizer, model.generation_config)
    gen.caption_prefixes = [[name, prefix] for name, prefix in prefixes]
    gen.audio_window, gen.audio_window_step = window.record(), window.step_seconds
    if caption_tokens:
        setattr(gen, CAPTION_TOKENS_KEY, int(caption_tokens))
    elif hasattr(gen, CAPTION_TOKENS_KEY):
        delattr(gen, CAPTION_TOKENS_KEY)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def recorded_prefixes(model) -> list[tuple[str, str]]:
    """The (source name, caption prefix) pairs ``save_model`` recorded with ``model``, inference's
    default first ([] for a model trained without prefixes)."""
    return [(name, prefix) for name, prefix in getattr(model.generation_config, "caption_prefixes", None) or []]


def recorded_window(model) -> AudioWindow:
    """The encoder window ``save_model`` recorded with ``model`` (``full`` for any other Whisper)."""
    gen = model.generation_config
    return AudioWindow.parse(getattr(gen, "audio_window", "full"),
                             getattr(gen, "audio_window_step", AudioWindow.step_seconds))


def recorded_caption_tokens(model) -> int | None:
    """The longest training caption in tokens (the end token included) that ``save_model`` recorded
    with ``model``, None where none was (the built-in model, a Hub id, a run resumed from a checkpoint
    older than the record). ``ModelLoadError`` for a value that is not a positive integer."""
    value = getattr(model.generation_config, CAPTION_TOKENS_KEY, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{Path(model.name_or_path) / 'generation_config.json'}: {CAPTION_TOKENS_KEY}={value!r}: "
                             f"must be an integer >= 1")
    return value


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
