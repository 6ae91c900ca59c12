"""The run folder's contract (``pipeline.runs``) on folders made here: the records, which run owns a
folder, which checkpoint a start resumes, what is set aside, rotation and the lock. Whole training
runs over these folders are in tests/test_train.py."""

import contextlib
import json
import types

import pytest

from pipeline.config import ConfigError
from pipeline.runs import (CHECKPOINT_RE, LOCK, PREVIOUS_RUNS, RUN_INFO, TRAINER_STATE, RunInfo, TrainerState,
                           checkpoint_name, checkpoint_state, claim_run, list_checkpoints, open_run,
                           rotate_checkpoints, temporary)
from shard_tools.fileio import hold_lock


def checkpoint(out, step: int, run_id: str | None, **extra):
    path = out / checkpoint_name(step)
    path.mkdir(parents=True)
    TrainerState(step=step, world_size=1, run_id=run_id, **extra).write(path)
    return path


def settings(resume=None, overwrite=False):
    return types.SimpleNamespace(resume_from_checkpoint=resume, overwrite_output_dir=overwrite)


def test_names_keep_temporary_folders_out_of_the_checkpoint_pattern():
    assert CHECKPOINT_RE.match(checkpoint_name(12)).group(1) == "12"
    assert not CHECKPOINT_RE.match(temporary(checkpoint_name(12)))


def test_trainer_state_reads_back_what_it_wrote_and_old_checkpoints_without_the_newer_keys(tmp_path):
    state = TrainerState(step=4, world_size=2, run_id="r", caption_tokens=17)
    state.write(tmp_path)
    assert json.loads((tmp_path / TRAINER_STATE).read_text()) == {"step": 4, "world_size": 2, "run_id": "r",
                                                                  "caption_tokens_longest": 17}
    assert TrainerState.read(tmp_path) == state
    (tmp_path / TRAINER_STATE).write_text(json.dumps({"step": 4, "world_size": 2}))
    old = TrainerState.read(tmp_path)
    assert (old.run_id, old.caption_tokens, old.caption_recorded) == (None, None, False)
    assert TrainerState(1, 1, caption_tokens=None).caption_problem() is None
    assert TrainerState(1, 1, caption_tokens=True).caption_problem() == (
        "caption_tokens_longest=True: must be an integer >= 0 or null")
    for broken in ("", "[1]", '{"world_size": 1}'):
        (tmp_path / TRAINER_STATE).write_text(broken)
        assert checkpoint_state(tmp_path) is None, broken


def test_latest_resumes_the_folders_own_newest_checkpoint_only(tmp_path, caplog):
    RunInfo("mine").write(tmp_path, {"world_size": 1})
    checkpoint(tmp_path, 2, "mine")
    checkpoint(tmp_path, 4, None)  # from before runs had ids: any run's
    checkpoint(tmp_path, 6, "other")
    (tmp_path / checkpoint_name(8)).mkdir()  # a save killed before its state was written
    (tmp_path / temporary(checkpoint_name(9))).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path, "mine")] == ["checkpoint-2", "checkpoint-4"]
    assert "checkpoint-8 has no readable trainer_state.json" in caplog.text
    claim = claim_run(tmp_path, settings("latest"))
    assert (claim.run_id, claim.checkpoint, claim.aside) == ("mine", tmp_path / "checkpoint-4", None)
    (tmp_path / "empty").mkdir()
    fresh = claim_run(tmp_path / "empty", settings("latest"))
    assert fresh.checkpoint is None and fresh.run_id


def test_a_fresh_run_is_refused_among_another_runs_files_unless_it_sets_them_aside(tmp_path):
    RunInfo("a").write(tmp_path, {})
    checkpoint(tmp_path, 2, "a")
    (tmp_path / LOCK).touch()
    with pytest.raises(ConfigError, match=f"{tmp_path} holds run a's files \\(checkpoint-2, run_info.json\\): "
                                          "continue it with trainer_config.resume_from_checkpoint=latest"):
        claim_run(tmp_path, settings())
    claim = claim_run(tmp_path, settings(overwrite=True))
    assert claim.run_id != "a" and claim.checkpoint is None and claim.aside.names == ["checkpoint-2", RUN_INFO]
    assert (tmp_path / "checkpoint-2").is_dir()  # nothing moves before the run passed its checks
    claim.aside.apply(tmp_path)
    (aside,) = (tmp_path / PREVIOUS_RUNS).iterdir()
    assert aside.name.startswith("a-") and sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", RUN_INFO]


def test_going_back_sets_the_later_checkpoints_aside_and_another_runs_checkpoint_is_refused(tmp_path):
    first = checkpoint(tmp_path, 2, "a")
    checkpoint(tmp_path, 4, "a")
    claim = claim_run(tmp_path, settings(str(first)))
    assert (claim.run_id, claim.checkpoint, claim.aside.names) == ("a", first, ["checkpoint-4"])
    other = checkpoint(tmp_path / "elsewhere", 2, "b")
    with pytest.raises(ConfigError, match="belongs to run b, but .* holds run a"):
        claim_run(tmp_path, settings(str(other)))
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        claim_run(tmp_path, settings(str(tmp_path / "nothing")))


def test_rotation_keeps_the_newest_of_this_run_and_never_another_runs(tmp_path):
    for step in (1, 2, 3):
        checkpoint(tmp_path, step, "a")
    checkpoint(tmp_path, 4, "b")
    saved = checkpoint(tmp_path, 5, "a")
    rotate_checkpoints(tmp_path, 2, "a", saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_a_folder_another_run_holds_is_one_line(tmp_path):
    with hold_lock(tmp_path / LOCK), contextlib.ExitStack() as lock:
        with pytest.raises(ConfigError, match=f"{tmp_path} is in use by another training run"):
            open_run(tmp_path, settings(), lock)
    with contextlib.ExitStack() as lock:
        assert open_run(tmp_path / "new", settings(), lock).checkpoint is None
        assert (tmp_path / "new" / LOCK).is_file()


def test_caption_length_is_read_from_the_config_saved_beside_a_model(tmp_path):
    from pipeline.config import load_config, save_config
    from pipeline.runs import caption_length, caption_length_default

    assert caption_length(tmp_path) == (caption_length_default(), "the default trainer_config.generation_max_new_tokens")
    assert caption_length("tiny")[0] == load_config().trainer_config.generation_max_new_tokens
    save_config(load_config(overrides=["trainer_config.generation_max_new_tokens=7"]), tmp_path / "config.yaml")
    assert caption_length(tmp_path) == (7, f"trainer_config.generation_max_new_tokens of {tmp_path / 'config.yaml'}")
    (tmp_path / "config.yaml").write_text("trainer_config:\n  generation_max_new_tokens: many\n")
    with pytest.raises(ConfigError, match=r"config.yaml: trainer_config.generation_max_new_tokens='many': must be"):
        caption_length(tmp_path)
