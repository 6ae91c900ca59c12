"""Run configuration: the YAML files, Hydra-grammar overrides, types, errors, interpolation, --config."""

import dataclasses
import re
import shutil

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, load_config, parse_override, save_config
from pipeline.data_settings import DataSettings, SpecAugment
from shard_tools.retry import RetryPolicy

SEED_COMMAND = [  # the seed guide's command line, verbatim
    "model_config.name=openai/whisper-small", "trainer_config.per_device_train_batch_size=16",
    "++trainer_config.learning_rate=1e-5", "++trainer_config.bf16=true", "trainer_config.max_steps=25000",
    "++trainer_config.save_total_limit=5", "++trainer_config.save_steps=5000",
    "++trainer_config.dataloader_num_workers=16", "++trainer_config.dataloader_prefetch_factor=4",
    "++trainer_config.split_batches=true", "++trainer_config.push_to_hub=true",
    "++trainer_config.hub_model_id=someone/whisper-small-captions",
]


def test_defaults_train_the_builtin_tiny_model():
    cfg = load_config()
    assert cfg.model_config.name == "tiny" and cfg.model_config.attn_implementation == "sdpa"
    assert cfg.model_config.torch_compile is False and cfg.model_config.gradient_checkpointing is False
    assert cfg.trainer_config.output_dir == "outputs/whisper-caption"  # ${paths.output_dir}/whisper-caption
    assert cfg.data_config.train_shards == "data/train"


def test_seed_command_overrides_apply_with_yaml_types():
    cfg = load_config(overrides=SEED_COMMAND)
    tc = cfg.trainer_config
    assert cfg.model_config.name == "openai/whisper-small"
    assert tc.learning_rate == 1e-5 and isinstance(tc.learning_rate, float)
    assert tc.bf16 is True and tc.split_batches is True and tc.push_to_hub is True
    assert (tc.max_steps, tc.save_total_limit, tc.save_steps) == (25000, 5, 5000)
    assert (tc.dataloader_num_workers, tc.dataloader_prefetch_factor) == (16, 4)
    assert tc.hub_model_id == "someone/whisper-small-captions"


def test_override_grammar_follows_hydra():
    assert parse_override("++trainer_config.bf16=true") == ("++", "trainer_config.bf16", True)
    assert parse_override("+model_config.dropout=0.1") == ("+", "model_config.dropout", 0.1)
    assert parse_override("trainer_config.eval_metrics=[bleu, cider_d]") == (
        "", "trainer_config.eval_metrics", ["bleu", "cider_d"])
    assert parse_override("trainer_config.hub_model_id=") == ("", "trainer_config.hub_model_id", "")
    assert parse_override("trainer_config.resume_from_checkpoint=null")[2] is None
    # '+' adds a key the YAML files do not set; on one they set it is an error, as in Hydra
    assert load_config(overrides=["+trainer_config.adam_beta2=0.98"]).trainer_config.adam_beta2 == 0.98
    with pytest.raises(ConfigError, match=r"already set by the config files.*\+\+trainer_config.max_steps"):
        load_config(overrides=["+trainer_config.max_steps=10"])
    assert load_config(overrides=["++trainer_config.max_steps=10"]).trainer_config.max_steps == 10
    with pytest.raises(ConfigError, match="cannot parse override"):
        load_config(overrides=["max_steps"])


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["trainer_config.learning_rat=1e-4"])
    message = str(info.value)
    assert "trainer_config.learning_rat" in message
    assert "learning_rate" in message and "per_device_train_batch_size" in message and "save_steps" in message
    with pytest.raises(ConfigError, match="valid sections: data_config, model_config, trainer_config, paths"):
        load_config(overrides=["++optimizer.lr=1"])


@pytest.mark.parametrize("override, expected", [
    ("trainer_config.max_steps=many", "int"), ("trainer_config.max_steps=2.5", "int"),
    ("trainer_config.bf16=perhaps", "bool"), ("model_config.dropout=[0.1]", "float"),
])
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    key = override.split("=")[0]
    assert f"wrong type for '{key}' (expected {expected}" in str(info.value)
    assert "valid keys of" in str(info.value)


def test_values_checked_across_keys():
    with pytest.raises(ConfigError, match="lr_scheduler_type='poly'"):
        load_config(overrides=["trainer_config.lr_scheduler_type=poly"])
    with pytest.raises(ConfigError, match="bf16 and trainer_config.fp16"):
        load_config(overrides=["++trainer_config.bf16=true", "++trainer_config.fp16=true"])
    with pytest.raises(ConfigError, match="hub_model_id"):
        load_config(overrides=["++trainer_config.push_to_hub=true"])


def test_interpolation_follows_overrides():
    cfg = load_config(overrides=["paths.output_dir=/runs"])
    assert cfg.trainer_config.output_dir == "/runs/whisper-caption"
    cfg = load_config(overrides=["trainer_config.output_dir=${paths.output_dir}/my_experiment",
                                 "paths.data_dir=/data"])
    assert cfg.trainer_config.output_dir == "outputs/my_experiment" and cfg.data_config.train_shards == "/data/train"
    with pytest.raises(ConfigError, match="paths.nowhere"):
        load_config(overrides=["trainer_config.output_dir=${paths.nowhere}/x"])


def test_other_main_file_with_its_own_defaults(tmp_path):
    (tmp_path / "small.yaml").write_text("model_config:\n  name: openai/whisper-small\n  dropout: 0.1\n")
    (tmp_path / "exp.yaml").write_text(
        "defaults:\n  - small\n  - _self_\n"
        "trainer_config:\n  output_dir: ${paths.output_dir}/exp\n  learning_rate: 3e-5\n"
        "paths:\n  output_dir: /runs\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model_config.dropout=0.2"])
    assert cfg.model_config.name == "openai/whisper-small" and cfg.model_config.dropout == 0.2
    assert cfg.trainer_config.output_dir == "/runs/exp" and cfg.trainer_config.learning_rate == 3e-5
    assert cfg.trainer_config.max_steps == 5000  # schema default for keys no file sets
    (tmp_path / "broken.yaml").write_text("defaults:\n  - missing\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "typo.yaml").write_text("trainer_config:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer_config.max_step'"):
        load_config(tmp_path / "typo.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=SEED_COMMAND + ["paths.output_dir=/runs"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer_config"]["output_dir"] == "/runs/whisper-caption"  # resolved, no ${...}
    assert saved["trainer_config"]["learning_rate"] == 1e-5 and saved["model_config"]["name"] == "openai/whisper-small"
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override,key", [
    ("trainer_config.learning_rate=.nan", "trainer_config.learning_rate"),
    ("trainer_config.learning_rate=-1e-4", "trainer_config.learning_rate"),
    ("trainer_config.max_grad_norm=.nan", "trainer_config.max_grad_norm"),
    ("trainer_config.seed=-1", "trainer_config.seed"),
    ("data_config.shuffle_buffer=0", "data_config.shuffle_buffer"),
    ("data_config.max_skip_fraction=2", "data_config.max_skip_fraction"),
    ("data_config.retry.retries=-1", "data_config.retry.retries=-1"),
    ("data_config.retry.backoff=99", "data_config.retry.backoff=99"),
    ("data_config.retry.deadline=0", "data_config.retry.deadline=0"),
    ("data_config.retry.timeout=.inf", "data_config.retry.timeout=inf"),
    ("data_config.retry.backoff_max=.inf", "data_config.retry.backoff_max=inf"),
    ("trainer_config.label_smoothing=1.0", "trainer_config.label_smoothing=1.0"),
    ("trainer_config.generation_num_beams=0", "trainer_config.generation_num_beams=0"),
    ("model_config.lora_r=-1", "model_config.lora_r=-1"),
    ("trainer_config.generation_max_new_tokens=0", "trainer_config.generation_max_new_tokens=0"),
    ("model_config.dropout=1.5", "model_config.dropout=1.5: must be within [0, 1)"),
    ("model_config.dropout=1.0", "model_config.dropout=1.0: must be within [0, 1)"),
    ("model_config.dropout=.nan", "model_config.dropout=nan: must be within [0, 1)"),
    ("model_config.lora_dropout=-0.1", "model_config.lora_dropout=-0.1: must be within [0, 1)"),
    ("model_config.mask_time_prob=1.5", "model_config.mask_time_prob=1.5: must be within [0, 1]"),
    ("model_config.mask_feature_prob=-1", "model_config.mask_feature_prob=-1.0: must be within [0, 1]"),
    ("model_config.mask_time_length=0", "model_config.mask_time_length=0: must be at least 1"),
    ("model_config.mask_feature_min_masks=-1", "model_config.mask_feature_min_masks=-1: must be at least 0"),
    ("data_config.max_label_tokens=100000", "data_config.max_label_tokens=100000: must be at most 448"),
    ("data_config.max_label_tokens=449", "data_config.max_label_tokens=449: must be at most 448"),
])
def test_out_of_range_values_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith("invalid config:\n") and key in str(info.value)


def test_caption_prefix_and_normalisation_reach_the_loader_settings():
    settings = load_config(overrides=["data_config.caption_prefix='clotho > caption:'",
                                      "data_config.normalize_captions=true"]).data_config.settings()
    assert settings.prefixes == (("default", "clotho > caption:"),) and settings.normalize_captions
    assert load_config().data_config.settings().prefixes == ()


def test_retry_keys_reach_the_loader_settings():
    dc = load_config(overrides=["data_config.retry.retries=2", "data_config.retry.timeout=5",
                                "++data_config.retry.deadline=null"]).data_config
    retry = dc.settings().retry
    assert (retry.retries, retry.timeout, retry.deadline, retry.backoff) == (2, 5.0, None, 1.0)


def test_spec_augment_section_turns_on_with_its_own_keys():
    assert load_config().data_config.settings().spec_augment is None
    on = load_config(overrides=["data_config.spec_augment.enabled=true", "++data_config.spec_augment.time_masks=3"])
    assert on.data_config.settings().spec_augment == SpecAugment(time_masks=3)
    with pytest.raises(ConfigError, match=r"data_config.spec_augment.freq_width=-1: must be at least 0"):
        load_config(overrides=["data_config.spec_augment.enabled=true", "data_config.spec_augment.freq_width=-1"])


def test_data_config_keys_are_the_loader_settings_own_fields_with_their_defaults():
    """A loader knob is one DataSettings field with its meaning: data_config has it under the same
    name (a policy as a section of its fields), its default and its meaning."""
    from pipeline.config import all_keys, keys_help

    loader = [f for f in dataclasses.fields(DataSettings) if "help" in f.metadata]
    assert {f.name for f in loader} >= {"shuffle_buffer", "on_error", "max_label_tokens", "spec_augment", "retry"}
    keys, text = all_keys(), keys_help()
    for f in loader:
        assert f"data_config.{f.name}" in keys or any(k.startswith(f"data_config.{f.name}.") for k in keys), f.name
        assert f"  {f.name}" in text and f.metadata["help"] in text, f.name
    for f in dataclasses.fields(RetryPolicy):
        assert f"data_config.retry.{f.name}" in keys and f.metadata["help"] in text
    for f in dataclasses.fields(SpecAugment):
        assert f"  spec_augment.{f.name} ({f.type} = {f.default}): {f.metadata['help']}" in text
    assert load_config(CONFIG_DIR / "paths.yaml").data_config.settings() == DataSettings(retry=RetryPolicy())


@pytest.mark.parametrize("old, new", [
    ("data_config.retries", "data_config.retry.retries"), ("data_config.retry_backoff", "data_config.retry.backoff"),
    ("data_config.retry_backoff_max", "data_config.retry.backoff_max"),
    ("data_config.read_timeout", "data_config.retry.timeout"), ("data_config.shard_deadline", "data_config.retry.deadline"),
    ("data_config.spec_time_masks", "data_config.spec_augment.time_masks"),
    ("data_config.spec_time_width", "data_config.spec_augment.time_width"),
    ("data_config.spec_freq_masks", "data_config.spec_augment.freq_masks"),
    ("data_config.spec_freq_width", "data_config.spec_augment.freq_width"),
    ("data_config.retry.backof", "data_config.retry.backoff"),
])
def test_a_renamed_or_misspelt_nested_key_names_its_spelling(old, new):
    with pytest.raises(ConfigError, match=rf"^unknown config key '{old}' \(did you mean '{new}'\?\); valid keys") as info:
        load_config(overrides=[f"++{old}=1"])
    assert "\n" not in str(info.value)


def test_a_section_is_set_key_by_key_and_its_keys_are_typed(tmp_path):
    with pytest.raises(ConfigError, match=r"^'data_config.spec_augment' is a section: set its keys "
                                          r"\(data_config.spec_augment.enabled, data_config.spec_augment.time_masks"):
        load_config(overrides=["data_config.spec_augment=true"])  # the on/off key before the section
    (tmp_path / "old.yaml").write_text("data_config:\n  retry: 3\n")
    with pytest.raises(ConfigError, match="'data_config.retry' is a section"):
        load_config(tmp_path / "old.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data_config.retry.retries=many"])
    assert "wrong type for 'data_config.retry.retries' (expected int" in str(info.value)
    assert "valid keys of 'data_config.retry': retries: int, backoff: float, " in str(info.value)
    with pytest.raises(ConfigError, match=r"valid keys of 'data_config.retry': backoff, backoff_max, deadline, "):
        load_config(overrides=["data_config.retry.wait=1"])
    (tmp_path / "nested.yaml").write_text("data_config:\n  retry:\n    backoff: 2.0\n  spec_augment: {enabled: true}\n")
    dc = load_config(tmp_path / "nested.yaml", ["data_config.retry.backoff_max=4"]).data_config
    assert dc.settings().retry == RetryPolicy(backoff=2.0, backoff_max=4.0)  # the other keys keep their defaults
    assert dc.settings().spec_augment == SpecAugment()


def test_yaml_files_agree_with_the_dataclass_defaults():
    """configs/*.yaml repeat some defaults for readers; each must equal its dataclass default."""
    from pipeline.config import SECTIONS

    def check(values: dict, schema, where: str) -> int:
        checked = 0
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(schema)}
        for key, value in values.items():
            if dataclasses.is_dataclass(defaults[key]):  # a nested section: its own keys
                checked += check(value, type(defaults[key]), f"{where}.{key}")
            else:
                assert value == defaults[key], f"{path.name}: {where}.{key}={value!r}, dataclass {defaults[key]!r}"
                checked += 1
        return checked

    checked = 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        for section, values in (yaml.safe_load(path.read_text()) or {}).items():
            if section in SECTIONS:
                checked += check(values, SECTIONS[section], section)
    assert checked > 25


def test_every_key_is_listed_with_type_default_and_meaning():
    from pipeline.config import all_keys, keys_help

    text = keys_help()
    for key in all_keys():
        assert f"\n  {key.split('.', 1)[1]} (" in text, key
    assert "\n  retry.backoff (float = 1.0): seconds before the first retry" in text
    assert "  max_steps (int = 5000): optimizer steps to train; > 0 wins over num_train_epochs" in text
    assert "  val_shards (Optional[str] = null): " in text and "  eval_metrics (list[str] = [" in text


@pytest.mark.parametrize("override, nearest", [
    ("trainer_config.max_step=5", "trainer_config.max_steps"), ("max_step=5", "trainer_config.max_steps"),
    ("trainer_confg.max_steps=5", "trainer_config"), ("paths.output_dr=x", "paths.output_dir"),
])
def test_a_typo_names_the_nearest_key(override, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_config(overrides=[override])


def test_logging_dir_takes_the_seeds_interpolation():
    cfg = load_config(overrides=["trainer_config.output_dir=/runs/a", "trainer_config.logging_dir=${trainer_config.output_dir}/tb_logs"])
    assert cfg.trainer_config.logging_dir == "/runs/a/tb_logs"
    assert load_config().trainer_config.logging_dir == "outputs/whisper-caption/tensorboard"


def test_train_sources_from_yaml_and_overrides_become_sources_with_their_prefixes(tmp_path):
    from pipeline.data_settings import DEFAULT_SOURCE, Source

    from pipeline.config import CONFIG_DIR

    for path in CONFIG_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path)
    with open(tmp_path / "main.yaml", "a") as f:
        f.write("data_config:\n  train_sources:\n"
                "    - {name: clotho, shards: '${paths.data_dir}/clotho', weight: 2, prefix: 'clotho > caption:'}\n"
                "    - {name: audiocaps, shards: 'data/ac/<000..009>.tar'}\n")
    dc = load_config(tmp_path / "main.yaml").data_config
    assert dc.sources() == [Source("clotho", "data/clotho", 2, "clotho > caption:"),
                            Source("audiocaps", "data/ac/<000..009>.tar")]
    assert dc.settings().prefixes == (("clotho", "clotho > caption:"),)
    override = load_config(overrides=["data_config.train_sources=[{name: a, shards: x, weight: 0.5}]"]).data_config
    assert override.sources() == [Source("a", "x", 0.5)]
    single = load_config(overrides=['data_config.caption_prefix="tell me:"']).data_config  # quoted: YAML
    assert single.sources() == [Source(DEFAULT_SOURCE, "data/train", 1.0, "tell me:")]
    assert single.settings().prefixes == ((DEFAULT_SOURCE, "tell me:"),)
    assert load_config().data_config.settings().prefixes == ()


def test_recorded_prefixes_put_the_highest_weight_first_and_validation_prompts_with_it_or_val_source():
    mix = ["data_config.train_sources=[{name: a, shards: x, prefix: 'a:'}, {name: b, shards: y, weight: 3, "
           "prefix: 'b:'}, {name: c, shards: z, weight: 2}]"]
    dc = load_config(overrides=mix).data_config
    assert dc.prefixes() == (("b", "b:"), ("a", "a:"))
    assert dc.val_prefix() == "b:"
    assert load_config(overrides=mix + ["data_config.val_source=a"]).data_config.val_prefix() == "a:"
    assert load_config(overrides=mix + ["data_config.val_source=c"]).data_config.val_prefix() == ""
    with pytest.raises(ConfigError, match=r"data_config.val_source='d': not one of the training sources \(a, b, c\)"):
        load_config(overrides=mix + ["data_config.val_source=d"])


def test_bad_train_sources_are_one_line_each_naming_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data_config.train_sources=[{name: a, shards: x, weight: 0}, {name: a, shards: y, "
                               "wieght: 1}, {shards: z}, {name: a, shards: w}]", "data_config.caption_prefix=p"])
    lines = str(info.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "data_config.caption_prefix='p': applies to train_shards only; give each of train_sources its prefix",
        "data_config.train_sources[0].weight=0: must be a finite number > 0",
        "data_config.train_sources[1]: unknown key(s) ['wieght'] (keys: name, shards, weight, prefix)",
        "data_config.train_sources[2]: needs ['name'] (keys: name, shards, weight, prefix)",
        "data_config.train_sources: name 'a' is given to more than one source"]
    with pytest.raises(ConfigError, match="wrong type for 'data_config.train_sources'"):
        load_config(overrides=["data_config.train_sources=clotho"])


def test_the_readme_mix_example_loads(tmp_path):
    from pipeline.config import CONFIG_DIR

    readme = (CONFIG_DIR.parent / "docs" / "training.md").read_text()
    example = readme.split("<!-- mix-example -->\n```yaml\n", 1)[1].split("```", 1)[0]
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mix.yaml").write_text(example)
    cfg = load_config(tmp_path / "recipes" / "mix.yaml")
    assert [(s.name, s.shards, s.weight, s.prefix) for s in cfg.data_config.sources()] == [
        ("clotho", "data/clotho/train", 1, "clotho > caption:"), ("audiocaps", "data/audiocaps/train", 2,
                                                                  "audiocaps > caption:"),
        ("wavcaps", "data/wavcaps/train", 3, "wavcaps > caption:")]
    assert cfg.model_config.name == "openai/whisper-small" and cfg.trainer_config.bf16



def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(overrides=["model_config.dropout=0.99", "model_config.mask_time_prob=1",
                                 "model_config.lora_dropout=0", "data_config.max_label_tokens=448"])
    assert cfg.model_config.dropout == 0.99 and cfg.data_config.settings().max_label_tokens == 448


def test_the_audio_window_is_full_fit_or_seconds_and_anything_else_is_refused_naming_it():
    assert load_config().model_config.audio_window == "full"
    assert load_config(overrides=["model_config.audio_window=10"]).model_config.audio_window == "10"
    for override, message in [("model_config.audio_window=half", "model_config.audio_window='half': must be"),
                              ("model_config.audio_window=40", "model_config.audio_window='40': must be"),
                              ("model_config.audio_window_step=0", "model_config.audio_window_step=0.0: must be")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=[override])
