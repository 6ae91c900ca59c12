"""Typed run configuration: YAML files composed by a defaults list, then Hydra-style overrides.

The dataclasses below are the schema: every key's type, default and one-line meaning (what
``train_stream.py --help`` prints); ``data_config``'s loader keys are ``DataSettings``' own fields.
Why not Hydra itself, and the grammar: docs/training.md, "How the configuration is built".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data_settings import DEFAULT_SOURCE, DataSettings, Source, key, source_prefixes
from pipeline.window import DEFAULT_STEP_SECONDS, AudioWindow
from shard_tools.fileio import write_atomic

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_MAIN = CONFIG_DIR / "main.yaml"
SCHEDULERS = ("linear", "cosine", "constant")
# generate_captions' decoders: pipeline.decode's static-cache path, and HF generate (the reference)
DECODE_METHODS = ("static", "hf")
# model_config's probabilities and their ranges: a dropout of 1 would zero every activation it drops
PROBABILITIES = {"dropout": "[0, 1)", "lora_dropout": "[0, 1)", "mask_time_prob": "[0, 1]",
                 "mask_feature_prob": "[0, 1]"}
SOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Source))
_DATA_HINTS = typing.get_type_hints(DataSettings)


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied; the message says which and why."""


@dataclass
class DataSources:
    """``data_config``'s own keys: the shards and their prompts. ``DataConfig`` adds the loader's."""

    train_shards: Optional[str] = key("${paths.data_dir}/train", "training shard URLs: 'data/train/<000..099>.tar', "
                                      "a split folder, a glob, http(s)://, pipe: (--shards)")
    train_sources: Optional[list[dict[str, Any]]] = key(None, "several training sources mixed by weight, each "
                                                         f"{{name, shards, weight ({Source.weight:g}), prefix "
                                                         f"({Source.prefix!r})}}; null: train_shards alone "
                                                         "(docs/training.md: mixing sources)")
    caption_prefix: str = key("", "text forced after the task tokens as the decoder prompt of the train_shards "
                              "source, not trained on, recorded with the model for inference (e.g. 'clotho > "
                              "caption:'); '': none; with train_sources each source has its own prefix")
    val_shards: Optional[str] = key(None, "validation shard URLs, as train_shards (--val-shards); null: no evaluation")
    val_source: Optional[str] = key(None, "with train_sources: the source whose prefix validation prompts with; "
                                    "null: the highest-weight source (the one inference uses by default)")

    def sources(self) -> list[Source]:
        """The training sources: ``train_sources``, or ``train_shards`` as the one source named
        ``DEFAULT_SOURCE`` with ``caption_prefix``. ValueError with one line per problem, each naming
        its key (``data_config.`` left off, as ``settings`` does)."""
        if not self.train_sources:
            return [Source(DEFAULT_SOURCE, self.train_shards or "", 1.0, self.caption_prefix)]
        problems, sources = [], []
        if self.caption_prefix:
            problems.append(f"caption_prefix={self.caption_prefix!r}: applies to train_shards only; give each "
                            f"of train_sources its prefix")
        for i, entry in enumerate(self.train_sources):
            where = f"train_sources[{i}]"
            unknown, missing = set(entry) - set(SOURCE_FIELDS), {"name", "shards"} - set(entry)
            if unknown or missing:
                why = [f"unknown key(s) {sorted(unknown)}"] * bool(unknown) + [f"needs {sorted(missing)}"] * bool(missing)
                problems.append(f"{where}: {'; '.join(why)} (keys: {', '.join(SOURCE_FIELDS)})")
                continue
            try:
                sources.append(Source(**entry))
            except ValueError as error:
                problems += [f"{where}.{line}" for line in str(error).splitlines()]
        names = [entry["name"] for entry in self.train_sources if "name" in entry]
        problems += [f"train_sources: name {name!r} is given to more than one source"
                     for name in sorted({str(n) for n in names if names.count(n) > 1})]
        if problems:
            raise ValueError("\n".join(problems))
        return sources

    def prefixes(self) -> tuple[tuple[str, str], ...]:
        """(source name, caption prefix) recorded with the model, highest weight first: inference
        (and validation, unless ``val_source`` names another) prompts with the first."""
        return source_prefixes(sorted(self.sources(), key=lambda source: -source.weight))

    def val_prefix(self) -> str:
        """The prefix validation prompts with: validation shards are one split, so one prompt
        (``val_source``'s, else the first of ``prefixes``). ValueError naming an unknown source."""
        if self.val_source is None:
            return next((prefix for _, prefix in self.prefixes()), "")
        names = [source.name for source in self.sources()]
        if self.val_source not in names:
            raise ValueError(f"val_source={self.val_source!r}: not one of the training sources ({', '.join(names)})")
        return dict(self.prefixes()).get(self.val_source, "")

    def settings(self, **run) -> DataSettings:
        """The loader settings of this section; ``run`` gives the run's own (batch size, seed,
        workers, ...). ValueError with one ``name=value: why`` line per bad setting."""
        loader = {f.name: _setting(f, getattr(self, f.name)) for f in _loader_fields()}
        return DataSettings(**loader, prefixes=source_prefixes(self.sources()), **run)


def _loader_fields() -> list[dataclasses.Field]:
    """The ``DataSettings`` fields that are ``data_config`` keys: those with a meaning (``key``)."""
    return [f for f in dataclasses.fields(DataSettings) if "help" in f.metadata]


def _policy(f: dataclasses.Field) -> type | None:
    """The dataclass a ``DataSettings`` field holds (``SpecAugment | None``: SpecAugment), else None."""
    hint = _DATA_HINTS[f.name]
    return next((t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)), None)


def _section(policy: type, extra: list) -> type:
    """A config section of ``policy``'s fields: same names, types, defaults and meanings, ``extra``
    first. A copy, as OmegaConf makes a frozen dataclass read-only."""
    hints = typing.get_type_hints(policy)
    return dataclasses.make_dataclass(
        f"{policy.__name__}Keys", extra + [(f.name, hints[f.name], key(f.default, f.metadata["help"]))
                                           for f in dataclasses.fields(policy)], namespace={"__module__": __name__})


def _data_key(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    """``DataSettings`` field ``f`` as a ``data_config`` key, or as a section of its policy's keys (with
    ``enabled`` first where the field says ``toggle``: off gives None)."""
    policy = _policy(f)
    if policy is None:
        return f.name, _DATA_HINTS[f.name], key(f.default, f.metadata["help"])
    extra = [("enabled", bool, key(f.default is not None, "true turns it on"))] if f.metadata["toggle"] else []
    section = _section(policy, extra)
    return f.name, section, field(default_factory=section, metadata={"help": f.metadata["help"]})


def _setting(f: dataclasses.Field, value: Any) -> Any:
    """The ``DataSettings`` value of key or section ``f``; a bad policy value says its ``section.key``."""
    policy = _policy(f)
    if policy is None:
        return value
    values = dataclasses.asdict(value)
    if f.metadata["toggle"] and not values.pop("enabled"):
        return None
    try:
        return policy(**values)
    except ValueError as error:
        raise ValueError("\n".join(f"{f.name}.{line}" for line in str(error).splitlines())) from None


# data_config: its own keys, then DataSettings' keys under their names (a loader knob is a field there)
DataConfig = dataclasses.make_dataclass("DataConfig", [_data_key(f) for f in _loader_fields()], bases=(DataSources,),
                                        namespace={"__module__": __name__})


@dataclass
class ModelConfig:
    name: str = key("tiny", "tiny (built in, offline, random weights) | a local checkpoint folder | a Hub id "
                    "such as openai/whisper-small")
    attn_implementation: str = key("sdpa", "sdpa | eager | flash_attention_2")
    gradient_checkpointing: bool = key(False, "recompute activations in the backward pass: less memory, slower")
    freeze_encoder: bool = key(False, "train the decoder only")
    freeze: list[str] = key([], "parameter names to freeze, as fnmatch patterns, e.g. \"['model.encoder.conv*', "
                            "'model.encoder.layers.[0-3].*']\" (front-end, first 4 encoder layers); each must match")
    lora_r: int = key(0, "LoRA rank on lora_target_modules (peft, the 'lora' extra); 0: full fine-tuning. "
                      "final/ holds the adapters merged into the weights")
    lora_alpha: float = key(32.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = key(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = key(["q_proj", "v_proj"], "module names that get LoRA adapters "
                                         "(peft target_modules), in encoder and decoder")
    dropout: float = key(0.0, "dropout in every encoder and decoder layer")
    apply_spec_augment: bool = key(False, "the model's own SpecAugment (HF WhisperConfig fields mask_*)")
    mask_time_prob: float = key(0.05, "model SpecAugment: share of frames masked")
    mask_time_length: int = key(10, "model SpecAugment: frames per time mask")
    mask_time_min_masks: int = key(2, "model SpecAugment: fewest time masks")
    mask_feature_prob: float = key(0.0, "model SpecAugment: share of mel bins masked")
    mask_feature_length: int = key(10, "model SpecAugment: bins per feature mask")
    mask_feature_min_masks: int = key(0, "model SpecAugment: fewest feature masks")
    torch_compile: bool = key(False, "torch.compile the model")
    audio_window: str = key("full", "what the encoder sees: full (Whisper's 30 s), fit (each batch's longest clip "
                            "rounded up to audio_window_step) or seconds (a fixed window, longer clips cut); "
                            "recorded with the model for inference (docs/training.md: encoder windows)")
    audio_window_step: float = key(DEFAULT_STEP_SECONDS, "fit windows are multiples of this many seconds")

    def window(self) -> AudioWindow:
        """The encoder window policy (checked by ``validate``)."""
        return AudioWindow.parse(self.audio_window, self.audio_window_step)


@dataclass
class TrainerConfig:
    output_dir: str = key("${paths.output_dir}/whisper-caption", "checkpoints, final/, metrics.jsonl, config.yaml")
    logging_dir: str = key("${trainer_config.output_dir}/tensorboard", "where TensorBoard event files go "
                           "(tensorboard --logdir DIR)")
    seed: int = key(42, "seeds the model's initial weights, shuffling, dropout and SpecAugment")
    per_device_train_batch_size: int = key(16, "training batch per process; the global batch when split_batches")
    per_device_eval_batch_size: int = key(16, "evaluation batch per process; the global batch when split_batches")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step")
    split_batches: bool = key(False, "batch sizes are global and split over the processes")
    learning_rate: float = key(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = key(0.01, "AdamW weight decay on matrices (none on biases and norms)")
    adam_beta1: float = key(0.9, "AdamW beta1")
    adam_beta2: float = key(0.999, "AdamW beta2")
    adam_epsilon: float = key(1e-8, "AdamW epsilon")
    max_grad_norm: float = key(1.0, "clip the gradient norm to this; 0: no clipping")
    lr_scheduler_type: str = key("linear", "linear | cosine | constant, after warmup_steps")
    warmup_steps: int = key(500, "steps of linear warmup from 0 to learning_rate")
    max_steps: int = key(5000, "optimizer steps to train; > 0 wins over num_train_epochs")
    num_train_epochs: float = key(1.0, "epochs to train when max_steps <= 0")
    bf16: bool = key(False, "bfloat16 autocast (slower than fp32 on a CPU)")
    fp16: bool = key(False, "float16 autocast with a gradient scaler")
    logging_steps: int = key(10, "log loss, lr, throughput every N steps (and always the first and last)")
    eval_steps: int = key(500, "evaluate on val_shards every N steps (and at the end)")
    eval_max_batches: int = key(50, "batches per process per evaluation")
    eval_metrics: list[str] = key(["bleu", "rouge_l", "cider_d"], "captioning metrics of each evaluation")
    generation_max_new_tokens: int = key(64, "longest caption generated during evaluation, in tokens")
    generation_num_beams: int = key(1, "beams of the captions generated during evaluation; 1: greedy")
    label_smoothing: float = key(0.0, "label smoothing of the training loss (the evaluation loss stays plain "
                                 "cross-entropy, comparable between runs)")
    save_steps: int = key(500, "save a checkpoint every N steps (and at the end)")
    save_total_limit: Optional[int] = key(None, "keep the newest N checkpoints; null keeps all")
    resume_from_checkpoint: Optional[str] = key(None, "latest | a checkpoint-STEP folder: continue that run")
    overwrite_output_dir: bool = key(False, "a fresh run where another run's files are: move those aside")
    log_sample_keys: bool = key(False, "write output_dir/sample_keys/rank-R.jsonl: the keys of every step")
    max_bad_steps: int = key(10, "steps skipped in a row (a NaN/inf loss or gradient, an fp16 overflow) before "
                             "the run stops")
    dataloader_num_workers: int = key(2, "loader worker processes per training process")
    dataloader_prefetch_factor: int = key(2, "batches each worker prepares ahead")
    dataloader_pin_memory: bool = key(True, "pinned host memory for batches (on a GPU only)")
    dataloader_persistent_workers: bool = key(False, "keep loader workers alive between epochs")
    push_to_hub: bool = key(False, "upload final/ to the Hub as hub_model_id (checked before training)")
    hub_model_id: Optional[str] = key(None, "the Hub repository to push to: user-or-org/name")


@dataclass
class PathsConfig:
    output_dir: str = key("outputs", "the folder runs write into (trainer_config.output_dir refers to it)")
    data_dir: str = key("data", "the folder of packed splits (data_config.train_shards refers to it)")


@dataclass
class RunConfig:
    data_config: DataConfig = field(default_factory=DataConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    trainer_config: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SECTIONS = {"data_config": DataConfig, "model_config": ModelConfig, "trainer_config": TrainerConfig,
            "paths": PathsConfig}


# ---------------------------------------------------------------------------------------------- YAML

class _YamlLoader(yaml.SafeLoader):
    """safe_load, plus ``1e-5`` read as a float (YAML 1.1 wants ``1.0e-5``; Hydra and OmegaConf do not)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """An override's value, typed as YAML; ``key=`` is the empty string, as in Hydra."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError:
        return text  # not YAML (e.g. a URL pattern with braces): the literal string


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader)  # noqa: S506
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def compose_files(main_file: str | os.PathLike) -> dict:
    """The main file merged with the files its ``defaults`` list names (relative to its folder)."""
    main_file = Path(main_file)
    own = _read_yaml(main_file)
    defaults = own.pop("defaults", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{main_file}: 'defaults' must be a list of file names, got {defaults!r}")
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    merged = OmegaConf.create({})
    for entry in defaults:
        part = own if entry == "_self_" else _read_yaml(main_file.parent / (
            entry if entry.endswith((".yaml", ".yml")) else f"{entry}.yaml"))
        merged = OmegaConf.merge(merged, OmegaConf.create(part))
    return OmegaConf.to_container(merged, resolve=False)


# ------------------------------------------------------------------------------------------- schema

def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}'{_did_you_mean(section, sections=True)}; valid sections: "
                          f"{', '.join(SECTIONS)}")
    return _fields_of(SECTIONS[section])


def _subsection(f: dataclasses.Field) -> type | None:
    """The dataclass of a nested section (``data_config.retry``), else None: ``f`` is a key."""
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None


def _keys(cls: type, where: str) -> Iterator[tuple[str, dataclasses.Field]]:
    """Every key of section ``cls`` named ``where``, nested sections walked, with its field."""
    for f in dataclasses.fields(cls):
        section = _subsection(f)
        yield from _keys(section, f"{where}.{f.name}") if section else [(f"{where}.{f.name}", f)]


def all_keys() -> list[str]:
    return [name for section, cls in SECTIONS.items() for name, _ in _keys(cls, section)]


def _did_you_mean(key: str, sections: bool = False) -> str:
    """`` (did you mean 'trainer_config.max_steps'?)`` for the key whose name within its section is
    nearest to this one's (in its own section first; the section may be left out), else the key whose
    last part ends this one's name (a section folded in: ``read_timeout`` for ``retry.timeout``), or
    the nearest section; or ""."""
    if sections:
        close = difflib.get_close_matches(key, SECTIONS, n=1, cutoff=0.75)
        return f" (did you mean '{close[0]}'?)" if close else ""
    section, _, name = key.partition(".") if key.split(".")[0] in SECTIONS else ("", "", key)
    # name within the section -> key; later entries win: the key's own section last
    names = {k.split(".", 1)[1]: k for k in sorted(all_keys(), key=lambda k: k.startswith(f"{section}."))}
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not close:
        folded = "_" + name.replace(".", "_")
        close = sorted((k for k in names if folded.endswith("_" + k.rpartition(".")[2])),
                       key=lambda k: -len(k.rpartition(".")[2]))[:1]
    return f" (did you mean '{names[close[0]]}'?)" if close else ""


def check_key(key: str) -> dataclasses.Field:
    """The schema field for ``section.name`` (``section.sub.name`` in a nested section), or a
    ConfigError naming the nearest key and listing the valid keys of the section reached."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{key}'{_did_you_mean(key)}; keys are section.name "
                          f"(python train_stream.py --help lists them)")
    fields, where = _section_fields(parts[0]), parts[0]
    for i, name in enumerate(parts[1:], 2):
        f = fields.get(name)
        section = f and _subsection(f)
        if f is None or (section is None and i < len(parts)):
            break
        if section is None:
            return f
        if i == len(parts):
            raise ConfigError(f"'{key}' is a section: set its keys "
                              f"({', '.join(name for name, _ in _keys(section, key))})")
        fields, where = _fields_of(section), f"{where}.{name}"
    raise ConfigError(f"unknown config key '{key}'{_did_you_mean(key)}; valid keys of '{where}': "
                      + ", ".join(sorted(name + ".*" * bool(_subsection(f)) for name, f in fields.items())))


def keys_help() -> str:
    """Every config key with its type, default and meaning, from the dataclasses above; a nested
    section's meaning heads its keys."""
    return "\n".join(line for section, cls in SECTIONS.items() for line in [f"{section}:", *_help_lines(cls, "")])


def _help_lines(cls: type, where: str) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        section = _subsection(f)
        if section:
            lines += [f"  {where}{f.name}: {f.metadata['help']}", *_help_lines(section, f"{where}{f.name}.")]
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = default if isinstance(default, str) else json.dumps(default)
        lines.append(f"  {where}{f.name} ({_type_name(f)} = {shown}): {f.metadata['help']}")
    return lines


def _is_section(path: str) -> bool:
    top, *names = path.split(".")
    cls = SECTIONS.get(top)
    for name in names:
        f = cls and _fields_of(cls).get(name)
        cls = f and _subsection(f)
    return bool(cls)


def _flat_keys(tree: dict, where: str = "") -> list[str]:
    """The keys a composed YAML tree sets: mappings walked into at the top and in nested sections (a
    mapping anywhere else is a value, refused by its key's type)."""
    keys = []
    for name, value in tree.items():
        key = f"{where}{name}"
        if isinstance(value, dict) and (where == "" or _is_section(key)):
            keys += _flat_keys(value, f"{key}.")
        else:
            keys.append(key)
    return keys


def _type_name(f: dataclasses.Field) -> str:
    return getattr(f.type, "__name__", None) or str(f.type).replace("typing.", "")


def _section_at(path: str) -> type:
    """The dataclass of section ``path`` (``data_config``, ``data_config.retry``), known to be one."""
    top, *names = path.split(".")
    return functools.reduce(lambda cls, name: _fields_of(cls)[name].default_factory, names, SECTIONS[top])


def _fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _set(cfg: DictConfig, key: str, value: Any, origin: str) -> None:
    f = check_key(key)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as error:
        section = key.rpartition(".")[0]
        typed = ", ".join(f"{name}.*" if _subsection(g) else f"{name}: {_type_name(g)}"
                          for name, g in _fields_of(_section_at(section)).items())
        raise ConfigError(f"{origin}: wrong type for '{key}' (expected {_type_name(f)}, got {value!r}): "
                          f"{str(error).splitlines()[0]}\nvalid keys of '{section}': {typed}") from None


# ------------------------------------------------------------------------------------------ overrides

_OVERRIDE = re.compile(r"^(\+\+|\+)?([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.DOTALL)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``'++trainer_config.bf16=true'`` → ``('++', 'trainer_config.bf16', True)``."""
    match = _OVERRIDE.match(text)
    if not match:
        raise ConfigError(f"cannot parse override '{text}': expected key=value, +key=value or ++key=value "
                          f"(e.g. trainer_config.max_steps=100)")
    prefix, key, value = match.groups()
    return prefix or "", key, parse_value(value)


def load_config(config_file: str | os.PathLike | None = None, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> RunConfig:
    """Compose ``config_file`` (default ``configs/main.yaml``), apply ``overrides`` (Hydra grammar),
    then ``values`` (already typed, e.g. ``{"data_config.train_shards": url}`` from a CLI flag), resolve
    interpolations and return the typed, validated config."""
    config_file = Path(config_file or DEFAULT_MAIN)
    from_files = compose_files(config_file)
    cfg = OmegaConf.structured(RunConfig)
    present = set(_flat_keys(from_files))
    for name in present:
        check_key(name)
    for name in sorted(present):
        _set(cfg, name, functools.reduce(dict.__getitem__, name.split("."), from_files), f"{config_file}")
    for text in overrides:
        prefix, key, value = parse_override(text)
        check_key(key)
        if prefix == "+" and key in present:
            raise ConfigError(f"override '{text}': '{key}' is already set by the config files; use "
                              f"'{key}=...' to change it or '++{key}=...' to add or change it")
        _set(cfg, key, value, f"override '{text}'")
    for key, value in (values or {}).items():
        _set(cfg, key, value, f"option {key}")
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the config: {str(error).splitlines()[0]}") from None
    validate(run)
    return run


def validate(cfg: RunConfig) -> None:
    """Checks across keys and of allowed values, each with the key in the message."""
    tc, dc = cfg.trainer_config, cfg.data_config
    problems = []
    if tc.lr_scheduler_type not in SCHEDULERS:
        problems.append(f"trainer_config.lr_scheduler_type={tc.lr_scheduler_type!r}: choose from {SCHEDULERS}")
    for check in (dc.sources, dc.settings, dc.val_prefix):
        try:
            check()
        except ValueError as error:
            problems += [f"data_config.{line}" for line in str(error).splitlines()]
            break  # settings() and val_prefix() read sources() too: said once
    for name in ("learning_rate", "max_grad_norm", "weight_decay", "adam_epsilon"):
        value = getattr(tc, name)
        if not (math.isfinite(value) and value >= 0):  # max_grad_norm=nan would turn clipping off unseen
            problems.append(f"trainer_config.{name}={value}: must be a finite number >= 0")
    if tc.seed < 0:
        problems.append(f"trainer_config.seed={tc.seed}: must be at least 0")
    if not 0 <= tc.label_smoothing < 1:
        problems.append(f"trainer_config.label_smoothing={tc.label_smoothing}: must be within [0, 1)")
    if tc.generation_num_beams < 1:
        problems.append(f"trainer_config.generation_num_beams={tc.generation_num_beams}: must be at least 1")
    mc = cfg.model_config
    for name, interval in PROBABILITIES.items():
        value = getattr(mc, name)
        if not (0 <= value < 1 if interval.endswith(")") else 0 <= value <= 1):  # nan fails both
            problems.append(f"model_config.{name}={value}: must be within {interval}")
    for name, low in (("mask_time_length", 1), ("mask_feature_length", 1), ("mask_time_min_masks", 0),
                     ("mask_feature_min_masks", 0)):  # HF raises on a length of 0 at the first masked step
        if getattr(mc, name) < low:
            problems.append(f"model_config.{name}={getattr(mc, name)}: must be at least {low}")
    try:
        AudioWindow.parse(mc.audio_window, mc.audio_window_step)
    except ValueError as error:
        problems.append(f"model_config.{error}")
    if mc.lora_r < 0:
        problems.append(f"model_config.lora_r={mc.lora_r}: must be at least 0 (0: no LoRA)")
    if mc.lora_r and not mc.lora_target_modules:
        problems.append("model_config.lora_target_modules is empty: name the modules LoRA adapts")
    if tc.bf16 and tc.fp16:
        problems.append("trainer_config.bf16 and trainer_config.fp16 are both true: pick one")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "eval_steps", "save_steps", "max_bad_steps", "generation_max_new_tokens"):
        if getattr(tc, name) < 1:
            problems.append(f"trainer_config.{name}={getattr(tc, name)}: must be at least 1")
    if tc.max_steps <= 0 and tc.num_train_epochs <= 0:
        problems.append("trainer_config.max_steps and num_train_epochs are both <= 0: set one")
    if tc.push_to_hub and not tc.hub_model_id:
        problems.append("trainer_config.push_to_hub=true needs trainer_config.hub_model_id")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    write_atomic(path, to_yaml(cfg))
