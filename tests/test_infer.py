"""infer_stream.py end to end: shards (local, HTTP, two processes), raw audio, resume, scores.

Predictions are checked against ``WhisperForConditionalGeneration.generate`` on features read with
plain tarfile (shards) or made by ``WhisperFeatureExtractor`` from ``librosa.load`` (raw audio).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import librosa
import pytest
import torch
from transformers import WhisperFeatureExtractor

import infer_stream
from pipeline import metrics
from pipeline.collate import prompt_ids
from pipeline.model import load_model, load_processor, save_model
from tests._infer_helpers import read_shards, reference_captions, serve_directory, write_sensitive_tiny
from tests.conftest import write_audio, write_mel_shards

ROOT = Path(__file__).resolve().parents[1]
SIZES = [3, 2, 2]  # 7 clips in 3 shards: divisible neither by 2 ranks nor by the batch sizes
MAX_NEW = 8
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_sensitive_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_mel_shards(tmp_path_factory.mktemp("shards") / "test", SIZES, captions_per_clip=2)


@pytest.fixture(scope="module")
def expected(model_dir, shards) -> dict:
    """key -> (reference caption, references) for greedy decoding."""
    keys, features, captions = read_shards(shards)
    preds = reference_captions(model_dir, features, max_new_tokens=MAX_NEW)
    assert len(set(preds)) > 2, "the test model must caption different clips differently"
    return {k: (p, c) for k, p, c in zip(keys, preds, captions)}


def run(*args) -> int:
    return infer_stream.main([str(a) for a in args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rows_match(rows: list[dict], expected: dict) -> None:
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "duplicate keys in the output"
    assert sorted(keys) == sorted(expected)
    for row in rows:
        pred, refs = expected[row["key"]]
        assert row == {"key": row["key"], "pred_caption": pred, "gt_caption": refs[0], "gt_captions": refs}


def test_shards_match_generate_and_are_scored(model_dir, shards, expected, tmp_path, capsys):
    out, scores = tmp_path / "preds.jsonl", tmp_path / "metrics.json"
    assert run("--model_name", model_dir, "--shards", Path(shards[0]).parent, "--batch_size", 4,
               "--num_dataloader_workers", 0, "--max_new_tokens", MAX_NEW, "--output", out,
               "--metrics-out", scores, "--metrics", "bleu,rouge_l,cider_d", "--print") == 0
    rows = read_jsonl(out)
    assert_rows_match(rows, expected)
    stdout = capsys.readouterr().out
    assert f"{len(expected)} clips in " in stdout and "clips/s)" in stdout
    assert str(rows[0]) in stdout  # --print: the list of rows
    assert stdout.rstrip().endswith(f"predictions: {out.resolve()} ({len(rows)} rows); metrics: {scores.resolve()}")
    saved = json.loads(scores.read_text())
    direct = metrics.score([r["pred_caption"] for r in rows], [r["gt_captions"] for r in rows],
                           metrics=("bleu", "rouge_l", "cider_d"))
    assert saved == json.loads(json.dumps(direct))
    assert saved["metrics"]["CIDEr_D"]["available"] and "not requested" in saved["metrics"]["METEOR"]["reason"]
    assert "BLEU_1" in stdout and "METEOR" in stdout  # the printed table, unavailable rows included


def test_http_shards_with_beam_search(model_dir, shards, tmp_path):
    keys, features, captions = read_shards(shards[1:])
    beams = reference_captions(model_dir, features, max_new_tokens=4, num_beams=2)
    out = tmp_path / "preds.jsonl"
    with serve_directory(Path(shards[0]).parent) as base:
        assert run("--model_name", model_dir, "--shards", base + "/{001..002}.tar", "--batch_size", 3,
                   "--num_dataloader_workers", 1, "--max_new_tokens", 4, "--num_beams", 2,
                   "--output", out, "--metrics", "bleu") == 0
    assert_rows_match(read_jsonl(out), {k: (p, c) for k, p, c in zip(keys, beams, captions)})


def test_the_recorded_prefix_prompts_and_is_stripped_unless_told_otherwise(model_dir, shards, expected, tmp_path,
                                                                          capsys):
    """No flag: the first prefix recorded with the model; ``--source``: that source's; ``--prefix ''``:
    none. Each against HF ``generate`` with the task tokens + prefix as its prompt."""
    prefixed, processor = tmp_path / "prefixed", load_processor(str(model_dir))
    recorded = [("clotho", "clotho > caption:"), ("kw", "keywords:")]
    save_model(load_model(str(model_dir), processor), processor, prefixed, prefixes=recorded)
    keys, features, captions = read_shards(shards)
    tok = processor.tokenizer

    def prompted(prefix: str) -> dict:
        prompt = torch.tensor([tok.prefix_tokens + prompt_ids(tok, prefix)]).expand(len(keys), -1)
        preds = reference_captions(prefixed, features, max_new_tokens=MAX_NEW, decoder_input_ids=prompt)
        return {k: (p, c) for k, p, c in zip(keys, preds, captions)}

    common = ["--model_name", prefixed, "--shards", Path(shards[0]).parent, "--batch_size", 4,
              "--num_dataloader_workers", 0, "--max_new_tokens", MAX_NEW, "--metrics", "bleu"]
    first = prompted("clotho > caption:")
    assert first != expected  # the prompt changes the captions
    for name, flags, want in [("first", [], first), ("kw", ["--source", "kw"], prompted("keywords:")),
                              ("none", ["--prefix", ""], expected)]:
        assert run(*common, "--output", tmp_path / f"{name}.jsonl", *flags) == 0
        assert_rows_match(read_jsonl(tmp_path / f"{name}.jsonl"), want)
    assert "caption prefix 'clotho > caption:'" in capsys.readouterr().out
    assert run(*common, "--output", tmp_path / "x.jsonl", "--source", "macs") == 2
    assert "--source macs: no prefix recorded for it" in capsys.readouterr().err


def test_raw_audio_matches_feature_extractor(model_dir, tmp_path, capsys):
    folder = tmp_path / "sounds"
    files = [write_audio(folder / "a.wav", 1.0, 16000, freq=300, seed=1),
             write_audio(folder / "dogs" / "b.flac", 2.2, 44100, freq=700, channels=2, seed=2),
             write_audio(folder / "c.mp3", 1.5, 22050, freq=1200, seed=3),
             write_audio(tmp_path / "loose.wav", 0.7, 8000, freq=2000, seed=4)]
    corrupt = folder / "broken.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    out = tmp_path / "preds.jsonl"
    assert run("--model_name", model_dir, "--audio", folder, files[-1], "--batch_size", 2,
               "--num_dataloader_workers", 2, "--max_new_tokens", MAX_NEW, "--output", out) == 0

    extractor = WhisperFeatureExtractor(feature_size=80)
    audio = [librosa.load(str(f), sr=16000)[0] for f in files]
    features = torch.from_numpy(extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"])
    preds = reference_captions(model_dir, features, max_new_tokens=MAX_NEW)
    assert len(set(preds)) == len(preds)
    rows = {row["key"]: row for row in read_jsonl(out)}
    assert rows == {str(f): {"key": str(f), "pred_caption": p, "gt_caption": None, "gt_captions": []}
                    for f, p in zip(files, preds)}
    captured = capsys.readouterr()
    assert f"skipped {corrupt}" in captured.err and "1 inputs skipped" in captured.err
    assert "no reference captions" in captured.out and "4 clips in " in captured.out


def test_audio_from_other_encoders_is_captioned_from_librosas_samples(model_dir, encoded_clips, tmp_path, capsys):
    # sox's LAME MP3s were skipped as truncated and .webm files not listed
    out = tmp_path / "preds.jsonl"
    assert run("--model_name", model_dir, "--audio", encoded_clips["espeak.wav"].parent, "--batch_size", 4,
               "--num_dataloader_workers", 0, "--max_new_tokens", MAX_NEW, "--output", out) == 0
    files = sorted(str(path) for path in encoded_clips.values())
    audio = [librosa.load(path, sr=16000)[0] for path in files]
    features = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    preds = reference_captions(model_dir, torch.from_numpy(features["input_features"]), max_new_tokens=MAX_NEW)
    assert {row["key"]: row["pred_caption"] for row in read_jsonl(out)} == dict(zip(files, preds))
    assert "skipped" not in capsys.readouterr().err


def test_resume_after_a_killed_run(model_dir, shards, expected, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    common = ["--model_name", model_dir, "--batch_size", 2, "--num_dataloader_workers", 0,
              "--max_new_tokens", MAX_NEW, "--output", out, "--metrics", "bleu"]
    assert run(*common, "--shards", shards[0]) == 0  # the first shard only
    first = read_jsonl(out)
    assert sorted(r["key"] for r in first) == sorted(k for k in expected if k.startswith("s000_"))
    # A run killed mid-way left two finished rows of shard 001 and half a line in its part file.
    killed = [{"key": k, "pred_caption": "from the killed run", "gt_caption": None, "gt_captions": []}
              for k in ("s001_0000", "s001_0001")]
    Path(f"{out}.part-00000").write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"key": "s001_00')
    capsys.readouterr()

    assert run(*common, "--shards", Path(shards[0]).parent, "--resume") == 0
    rows = read_jsonl(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)
    assert rows[:len(first)] == first  # earlier rows kept as they were, new ones appended
    assert [r for r in rows if r["key"] in ("s001_0000", "s001_0001")] == killed  # not generated again
    new = len(expected) - len(first) - len(killed)
    captured = capsys.readouterr()
    assert f"{new} clips in " in captured.out and "duplicate" not in captured.err
    assert "not a JSON row" in captured.err  # the cut-off line was reported, its clip captioned again
    assert not list(tmp_path.glob("preds.jsonl.part-*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_every_key_exactly_once(model_dir, shards, expected, tmp_path):
    out = tmp_path / "preds.jsonl"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "infer_stream.py"), "--model_name", str(model_dir), "--shards", str(Path(shards[0]).parent),
           "--batch_size", "2", "--num_dataloader_workers", "0", "--max_new_tokens", str(MAX_NEW),
           "--output", str(out), "--metrics", "bleu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "captioning on 2 process(es)" in proc.stdout
    assert f"{len(expected)} clips in " in proc.stdout and "duplicate" not in proc.stderr
    assert_rows_match(read_jsonl(out), expected)


def test_offline_hub_id_exits_2_with_the_reason(shards, tmp_path, capsys):
    code = run("--model_name", "openai/whisper-no-such-model", "--shards", shards[0], "--output", tmp_path / "p.jsonl")
    assert code == 2
    err = capsys.readouterr().err
    assert "openai/whisper-no-such-model" in err and "use --model-name tiny" in err and "model_config" not in err


def test_help_shows_defaults_and_the_seeds_spellings_without_loading_torch():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}  # one line per option
    done = subprocess.run([sys.executable, "-X", "importtime", "infer_stream.py", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for text in ("--model-name MODEL_NAME, --model_name MODEL_NAME", "--batch-size BATCH_SIZE, --batch_size",
                 "--num_dataloader_workers", "(default: 16)", "(default: preds.jsonl)"):
        assert text in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert not imported & {"torch", "transformers", "accelerate"}  # so --help answers at once
    bad = subprocess.run([sys.executable, "infer_stream.py", "--model-name", "tiny", "--shards", "x", "--num_beams", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-beams" in bad.stderr


def test_bf16_runs_the_model_in_bfloat16(model_dir, shards, expected, tmp_path, monkeypatch):
    dtypes, real_load = set(), infer_stream.load_model

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        for module in (model.model.encoder.conv1, model.model.decoder.layers[0].fc1):
            module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
        return model

    monkeypatch.setattr(infer_stream, "load_model", load_model)
    out = tmp_path / "preds.jsonl"
    assert run("--model_name", model_dir, "--shards", shards[1], "--bf16", "--num_dataloader_workers", 0,
               "--max_new_tokens", 4, "--output", out, "--metrics", "bleu") == 0
    assert sorted(r["key"] for r in read_jsonl(out)) == sorted(k for k in expected if k.startswith("s001_"))
    assert dtypes == {torch.bfloat16}  # encoder and decoder, every forward


def test_a_busy_or_unwritable_output_is_refused_before_any_clip(model_dir, shards, expected, tmp_path, capsys,
                                                                 monkeypatch):
    from shard_tools.fileio import hold_lock

    out = tmp_path / "preds.jsonl"
    calls = []
    monkeypatch.setattr(infer_stream, "run_generation", lambda *a, **k: calls.append(1) or infer_stream.Generated(0, 0, 0))
    with hold_lock(f"{out}.lock"):  # a first run still at work on this output
        assert run("--model_name", model_dir, "--shards", shards[0], "--output", out, "--metrics", "bleu") == 2
    err = capsys.readouterr().err
    assert "being written by another infer_stream.py run" in err and not calls and not out.exists()
    (tmp_path / "dir.jsonl").mkdir()
    assert run("--model_name", model_dir, "--shards", shards[0], "--output", tmp_path / "dir.jsonl") == 2
    assert "is a folder" in capsys.readouterr().err and not calls
    assert run("--model_name", model_dir, "--shards", tmp_path / "none" / "*.tar", "--output", out) == 2
    err = capsys.readouterr().err
    assert "no file matches" in err and "Traceback" not in err and not calls
    monkeypatch.undo()
    # With the output free again, the run completes with every row.
    assert run("--model_name", model_dir, "--shards", ",".join(shards), "--output", out,
               "--max_new_tokens", MAX_NEW, "--num_dataloader_workers", 0, "--metrics", "bleu") == 0
    assert_rows_match(read_jsonl(out), expected)


def test_caption_length_defaults_to_the_trained_models_and_stages_are_timed(model_dir, shards, tmp_path, capsys):
    """No --max-new-tokens: the longest training caption recorded with the checkpoint gives the
    length, even above the config's setting; without a record, the checkpoint's config.yaml
    (train_stream.py's) does."""
    import shutil

    from pipeline.config import load_config, save_config

    model = shutil.copytree(model_dir, tmp_path / "model")
    save_config(load_config(overrides=["trainer_config.generation_max_new_tokens=3"]), model / "config.yaml")
    keys, features, captions = read_shards(shards[1:2])
    reference = reference_captions(model_dir, features, max_new_tokens=3)
    out = tmp_path / "preds.jsonl"
    assert run("--model_name", model, "--shards", shards[1], "--num_dataloader_workers", 0, "--output", out,
               "--metrics", "bleu") == 0
    assert_rows_match(read_jsonl(out), {k: (p, c) for k, p, c in zip(keys, reference, captions)})
    stdout = capsys.readouterr().out
    assert f"at most 3 tokens per caption (trainer_config.generation_max_new_tokens of {model / 'config.yaml'})" \
        in stdout
    assert re.search(r"^time: encoder \d+%, decoder \d+%, data and output \d+% \(this process\)$", stdout, re.M)

    processor = load_processor(str(model))
    save_model(load_model(str(model), processor), processor, model, caption_tokens=5)  # as training records it
    longer = reference_captions(model_dir, features, max_new_tokens=5)
    assert longer != reference
    assert run("--model_name", model, "--shards", shards[1], "--num_dataloader_workers", 0, "--output", out,
               "--metrics", "bleu") == 0
    assert_rows_match(read_jsonl(out), {k: (p, c) for k, p, c in zip(keys, longer, captions)})
    stdout = capsys.readouterr().out
    assert f"at most 5 tokens per caption (the longest training caption, recorded with {model})" in stdout


def test_bf16_is_the_default_on_a_gpu_only():
    from types import SimpleNamespace

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = SimpleNamespace(bf16=False, fp32=False)
    assert infer_stream.model_dtype(args, cuda) == torch.bfloat16
    assert infer_stream.model_dtype(args, cpu) == torch.float32
    assert infer_stream.model_dtype(SimpleNamespace(bf16=False, fp32=True), cuda) == torch.float32
    assert infer_stream.model_dtype(SimpleNamespace(bf16=True, fp32=False), cpu) == torch.bfloat16
    with pytest.raises(SystemExit):
        infer_stream.parse_args(["--model-name", "tiny", "--shards", "x", "--bf16", "--fp32"])


def one_error(err: str) -> bool:
    """``err`` (progress bars aside) holds exactly one error line."""
    return len([line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]) == 1


def test_audio_folders_behind_links_are_searched_once_and_each_file_is_captioned_once(tmp_path, capsys, monkeypatch):
    """A link to a folder is followed (a loop or a second way to a folder searched once); one file
    named by several paths (relative, absolute, a link) is one input, the drop counted on stderr."""
    sounds, more = tmp_path / "sounds", tmp_path / "elsewhere" / "more"
    x, y = write_audio(sounds / "x.wav"), write_audio(more / "y.flac")
    (sounds / "linked").symlink_to(more, target_is_directory=True)  # train/linked -> /data/more
    (sounds / "loop").symlink_to(sounds, target_is_directory=True)
    (tmp_path / "link-to-x.wav").symlink_to(x)
    monkeypatch.chdir(tmp_path)  # relative and absolute names of the same files
    files = infer_stream.find_audio(["sounds", "sounds/x.wav", str(x), "link-to-x.wav", "elsewhere"])
    assert files == [os.path.join("sounds", "linked", "y.flac"), os.path.join("sounds", "x.wav")]
    err = capsys.readouterr().err
    assert "3 duplicate input(s) dropped" in err  # x.wav named again: relative, absolute, through a link
    assert f"{os.path.join('sounds', 'loop')} is {sounds}, already searched" in err
    assert f"{os.path.join('elsewhere', 'more')} is {more}, already searched" in err and "no audio files" not in err
    assert y.exists()


def test_resume_refuses_other_settings_and_never_mixes_runs(model_dir, shards, tmp_path, capsys, monkeypatch):
    """Settings are recorded beside the output; ``--resume`` with another model, prefix, caption
    length or beam count is refused naming what differs, before any clip; the same model named by
    another path resumes. A fresh run killed before its merge leaves the earlier run's rows to be
    replaced, never kept as its own."""
    import shutil

    out = tmp_path / "preds.jsonl"
    common = ["--shards", shards[1], "--num_dataloader_workers", 0, "--output", out, "--metrics", "bleu"]
    assert run("--model_name", model_dir, "--max_new_tokens", MAX_NEW, *common) == 0
    first = out.read_text()
    record = json.loads(Path(f"{out}.settings.json").read_text())
    assert record == {"settings": {"model": str(model_dir.resolve()), "prefix": "", "max_new_tokens": MAX_NEW,
                                   "num_beams": 1, "decoder": "static", "dtype": "float32", "audio_window": "full"},
                      "output_rows": True}
    other = shutil.copytree(model_dir, tmp_path / "other-model")
    calls = []
    real_generation = infer_stream.run_generation
    monkeypatch.setattr(infer_stream, "run_generation", lambda *a, **k: calls.append(1) or (0, 0))
    for flags, differs in [(["--max_new_tokens", 4], f"max_new_tokens {MAX_NEW} (now 4)"),
                           (["--max_new_tokens", MAX_NEW, "--prefix", "a dog"], "prefix '' (now 'a dog')"),
                           (["--max_new_tokens", MAX_NEW, "--num_beams", 2], "num_beams 1 (now 2)"),
                           (["--max_new_tokens", MAX_NEW, "--audio-window", "fit"],
                            "audio_window 'full' (now 'fit (5-s steps)')")]:
        assert run("--model_name", model_dir, *flags, *common, "--resume") == 2
        err = capsys.readouterr().err
        assert differs in err and one_error(err) and "--resume" in err, err
    assert run("--model_name", other, "--max_new_tokens", MAX_NEW, *common, "--resume") == 2
    assert f"model {str(model_dir.resolve())!r} (now {str(other.resolve())!r})" in capsys.readouterr().err
    assert not calls and out.read_text() == first
    monkeypatch.setattr(infer_stream, "run_generation", real_generation)
    relative = os.path.relpath(model_dir, ROOT)  # the same folder, named another way
    assert run("--model_name", relative, "--max_new_tokens", MAX_NEW, *common, "--resume") == 0
    assert out.read_text() == first

    # A fresh run with 4 tokens, killed before its merge; its --resume replaces the 8-token rows.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_stream, "run_generation", killed)
    with pytest.raises(KeyboardInterrupt):
        run("--model_name", model_dir, "--max_new_tokens", 4, *common)
    monkeypatch.setattr(infer_stream, "run_generation", real_generation)
    assert run("--model_name", model_dir, "--max_new_tokens", 4, *common, "--resume") == 0
    keys, features, captions = read_shards(shards[1:2])
    shorter = reference_captions(model_dir, features, max_new_tokens=4)
    assert_rows_match(read_jsonl(out), {k: (p, c) for k, p, c in zip(keys, shorter, captions)})
    assert "from before an interrupted run without --resume" in capsys.readouterr().err
    # An output without a record (another tool's, an older version's) is not resumed blindly.
    Path(f"{out}.settings.json").unlink()
    assert run("--model_name", model_dir, "--max_new_tokens", 4, *common, "--resume") == 2
    assert "no record of the settings" in capsys.readouterr().err


def test_only_regular_files_or_new_paths_are_written(model_dir, shards, tmp_path, capsys, monkeypatch):
    """An output, lock, settings or metrics path that is a link, a pipe or a device is refused
    (exit 2, one line) before any clip, and left as it was; so is it by ``write_atomic`` and ``hold_lock``."""
    from shard_tools.fileio import NotRegularFile, check_replaceable, hold_lock, write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    calls = []
    monkeypatch.setattr(infer_stream, "run_generation", lambda *a, **k: calls.append(1) or (0, 0))
    links = {name: tmp_path / name for name in ("link.jsonl", "a.jsonl.lock", "b.jsonl.settings.json", "m.json")}
    for link in links.values():
        link.symlink_to(victim)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for output, metrics_out, named in [(links["link.jsonl"], None, links["link.jsonl"]),
                                       (tmp_path / "a.jsonl", None, links["a.jsonl.lock"]),
                                       (tmp_path / "b.jsonl", None, links["b.jsonl.settings.json"]),
                                       (tmp_path / "c.jsonl", links["m.json"], links["m.json"]),
                                       (fifo, None, fifo)]:
        extra = ["--metrics-out", metrics_out] if metrics_out else []
        assert run("--model_name", model_dir, "--shards", shards[1], "--num_dataloader_workers", 0,
                   "--output", output, *extra) == 2
        err = capsys.readouterr().err
        assert f"{named} is a" in err and one_error(err), err
    assert not calls and victim.read_text() == "keep me\n" and all(p.is_symlink() for p in links.values())
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "link.jsonl.lock").exists()
    for path in ("/dev/stdout", "/dev/null"):
        with pytest.raises(NotRegularFile, match="symbolic link|device"):
            check_replaceable(path)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        write_atomic(links["m.json"], "x")
    with pytest.raises(NotRegularFile, match="symbolic link"), hold_lock(links["a.jsonl.lock"]):
        pass
    assert victim.read_text() == "keep me\n" and not list(tmp_path.glob(".*.tmp"))
    write_atomic(tmp_path / "new.txt", "a")  # a new path and a regular file are written as before
    write_atomic(tmp_path / "new.txt", "b")
    assert (tmp_path / "new.txt").read_text() == "b"


def test_output_dash_writes_the_rows_to_standard_output(model_dir, shards, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("--model_name", model_dir, "--shards", shards[1], "--num_dataloader_workers", 0,
               "--max_new_tokens", MAX_NEW, "--output", "-", "--metrics", "bleu") == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]  # nothing else on stdout
    assert_rows_match(rows, {k: v for k, v in expected.items() if k.startswith("s001_")})
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert "captioning on 1 process(es)" in captured.err and "BLEU_1" in captured.err
    assert "predictions: standard output (2 rows)" in captured.err
    assert not list(tmp_path.iterdir())  # no lock, settings or part file
    with pytest.raises(SystemExit) as exit_info:
        infer_stream.parse_args(["--model-name", "tiny", "--shards", "x", "--output", "-", "--resume"])
    assert exit_info.value.code == 2 and "--resume needs a file --output" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--num-dataloader-workers", "-1"], "--num-dataloader-workers -1: must be at least 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: must be at least 1")])
def test_out_of_range_options_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_stream.parse_args(["--model-name", "tiny", "--shards", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_prefix_leaving_no_room_for_a_caption_is_one_line(model_dir, shards, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    assert run("--model_name", model_dir, "--shards", shards[1], "--num_dataloader_workers", 0, "--output", out,
               "--prefix", " ".join(["word"] * 600)) == 2
    err = capsys.readouterr().err
    assert ("error: --prefix: the caption prefix takes 600 tokens; with the 4 task tokens that leaves no room for a "
            "caption in the decoder's 448 positions (at most 443 prefix tokens)") in err, err
    assert one_error(err) and not out.exists()


def test_a_model_folder_without_tokenizer_files_is_one_line(model_dir, shards, tmp_path, capsys):
    import shutil

    bare = shutil.copytree(model_dir, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    assert run("--model_name", bare, "--shards", shards[1], "--output", tmp_path / "preds.jsonl") == 2
    err = capsys.readouterr().err
    assert f"--model-name: {bare} has no tokenizer files (tokenizer.json or vocab.json and merges.txt)" in err
    assert one_error(err)


@pytest.mark.parametrize("index", [True, False], ids=["index", "no-index"])
def test_shards_with_other_mel_bins_than_the_model_are_one_line(model_dir, tmp_path, capsys, index):
    """128-mel shards, an 80-mel model: the index says so before any clip; without one, the first batch."""
    mels = write_mel_shards(tmp_path / "mel128", [2], n_mels=128, index=index)
    assert run("--model_name", model_dir, "--shards", mels[0], "--num_dataloader_workers", 0,
               "--output", tmp_path / "preds.jsonl", "--max_new_tokens", 4) == 2
    err = capsys.readouterr().err
    assert f"the features have 128 mel bins, model {model_dir} reads 80 (num_mel_bins)" in err, err
    assert one_error(err)


def test_a_generation_config_the_static_decoder_cannot_follow_is_one_line(model_dir, shards, tmp_path, capsys):
    processor = load_processor(str(model_dir))
    model = load_model(str(model_dir), processor)
    model.generation_config.repetition_penalty = 1.3
    save_model(model, processor, tmp_path / "penalised")
    assert run("--model_name", tmp_path / "penalised", "--shards", shards[1], "--num_dataloader_workers", 0,
               "--output", tmp_path / "preds.jsonl") == 2
    err = capsys.readouterr().err
    assert "generation_config.repetition_penalty=1.3 is not implemented by the static decoder" in err, err
    assert one_error(err) and not (tmp_path / "preds.jsonl").exists()


def test_the_window_recorded_with_a_model_is_followed_and_audio_window_overrides_it(model_dir, shards, expected,
                                                                                    tmp_path, capsys, monkeypatch):
    from pipeline.model import FittedWhisperEncoder
    from pipeline.window import AudioWindow

    widths, forward = [], FittedWhisperEncoder.forward

    def seen(self, input_features, *args, **kwargs):
        widths.append(input_features.shape[-1])
        return forward(self, input_features, *args, **kwargs)

    monkeypatch.setattr(FittedWhisperEncoder, "forward", seen)

    fit_dir = tmp_path / "fit-model"
    processor = load_processor(str(model_dir))
    save_model(load_model(str(model_dir), processor), processor, fit_dir, window=AudioWindow.parse("fit", 0.1))
    keys, features, _ = read_shards(shards)
    frames = {k: f.shape[-1] - int((f.flip(-1) == f[:, -1:]).all(0).int().cumprod(0).sum()) for k, f in
              zip(keys, features)}  # valid frames: before the trailing columns of the clip's pad value
    window = {k: AudioWindow.parse("fit", 0.1).frames(n) for k, n in frames.items()}  # 5-11 frames: 10, or 20 for 13+
    want = {k: reference_captions(fit_dir, f[None, :, :window[k]], max_new_tokens=MAX_NEW)[0]
            for k, f in zip(keys, features)}
    widths.clear()
    out = tmp_path / "fit.jsonl"
    assert run("--model-name", fit_dir, "--shards", Path(shards[0]).parent, "--batch-size", 1,
               "--num-dataloader-workers", 0, "--max-new-tokens", MAX_NEW, "--output", out) == 0
    assert {r["key"]: r["pred_caption"] for r in read_jsonl(out)} == want
    assert sorted(widths) == sorted(window.values()) and max(widths) < 3000  # each clip in its own window
    assert "audio window fit (0.1-s steps)" in capsys.readouterr().out
    assert json.loads(Path(f"{out}.settings.json").read_text())["settings"]["audio_window"] == "fit (0.1-s steps)"
    full = tmp_path / "full.jsonl"
    assert run("--model-name", fit_dir, "--shards", Path(shards[0]).parent, "--batch-size", 4, "--audio-window",
               "full", "--num-dataloader-workers", 0, "--max-new-tokens", MAX_NEW, "--output", full) == 0
    assert_rows_match(read_jsonl(full), expected)
    cut = tmp_path / "cut.jsonl"
    assert run("--model-name", fit_dir, "--shards", Path(shards[0]).parent, "--audio-window", "0.04",
               "--num-dataloader-workers", 0, "--max-new-tokens", MAX_NEW, "--output", cut) == 0
    longer = sum(n > 4 + 2 for n in frames.values())  # beyond the window and a clip's 2 edge frames
    assert longer and f"{longer} clips longer than the 0.04 s audio window were cut to it" in capsys.readouterr().err


def test_an_audio_window_outside_whispers_is_refused(capsys):
    with pytest.raises(SystemExit):
        infer_stream.parse_args(["--model-name", "tiny", "--shards", "x", "--audio-window", "45"])
    assert "--audio-window='45': must be 'full', 'fit' or seconds in (0, 30]" in capsys.readouterr().err


def test_audio_files_are_batched_with_others_of_like_length_unless_told_not_to(tmp_path):
    import types

    seconds = {"a": 3.0, "b": 0.5, "c": 2.9, "d": 0.6, "e": 1.5, "f": 1.4}
    for name, length in seconds.items():
        write_audio(tmp_path / "clips" / f"{name}.wav", seconds=length)
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    processor = load_processor("tiny")

    def batches(*flags) -> list[list[str]]:
        args = infer_stream.parse_args(["--model-name", "tiny", "--audio", str(tmp_path / "clips"), "--batch-size", "2",
                                        "--num-dataloader-workers", "0", *flags])
        loader, expected, _ = infer_stream.make_batches(args, processor, accelerator, 80)
        assert expected == len(seconds)
        return [[Path(key).stem for key in batch["keys"]] for batch in loader]

    assert batches() == [["b", "d"], ["f", "e"], ["c", "a"]]  # by duration
    assert batches("--bucket-pool-batches", "0") == [["a", "b"], ["c", "d"], ["e", "f"]]  # as found
