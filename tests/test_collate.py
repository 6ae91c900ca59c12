"""Collator against the references: WhisperFeatureExtractor for padded features, the tokenizer for
labels, and the HF model's own loss for the label shift."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pipeline.collate import LABEL_WIDTHS, Collator, expand_features, normalize_caption, prompt_ids
from pipeline.config import ConfigError
from pipeline.data_settings import DEFAULT_SOURCE, MAX_TARGET_POSITIONS, SOURCE_KEY, SpecAugment
from shard_tools.features import clip_features, pad_mel
from pipeline.model import load_model
from tests.conftest import tone


def clip_sample(key: str, seconds: float, captions: list[str], freq: float = 440.0) -> tuple[dict, np.ndarray]:
    audio = tone(seconds, 16000, freq=freq)
    feats = clip_features(audio)
    meta = {"captions": captions, "pad_value": feats["pad_value"], "source": f"{key}.wav", "seconds": seconds}
    return {"__key__": key, "mel": feats["mel"], "json": meta}, audio


def test_features_are_padded_like_the_feature_extractor(tiny_processor):
    samples, audios = zip(*[clip_sample("a", 1.3, ["x"]), clip_sample("b", 4.0, ["y"], 880.0),
                            clip_sample("c", 0.2, ["z"], 300.0)])
    batch = Collator(tiny_processor.tokenizer)(list(samples))
    feats = batch["input_features"]
    assert feats.dtype == torch.float16 and feats.shape == (3, 80, 3000)
    reference = WhisperFeatureExtractor(feature_size=80)(list(audios), sampling_rate=16000,
                                                         return_tensors="np").input_features  # [3, 80, 3000]
    np.testing.assert_allclose(feats.float().numpy(), reference, atol=2e-3)
    for row, sample in zip(feats, samples):  # exactly pad_mel with each clip's own pad_value
        np.testing.assert_array_equal(row.numpy(), pad_mel(sample["mel"], sample["json"]["pad_value"]))


def test_expand_features_builds_the_padded_batch_from_the_compact_one(tiny_processor):
    """What loaders hand over (cut after the longest clip, plus pad values) expands, in float16 or
    straight into the step's float32, to exactly the padded batch, itself the extractor's."""
    samples, audios = zip(*[clip_sample("a", 1.3, ["x"]), clip_sample("b", 0.2, ["y"], 300.0)])
    samples = [*samples, {"__key__": "", "__pad__": True}]
    collate = Collator(tiny_processor.tokenizer)
    compact = collate.compact(samples)
    assert compact["input_features"].shape == (3, 80, samples[0]["mel"].shape[1])
    padded = collate(samples)["input_features"]  # [3, 80, 3000] float16
    assert torch.equal(expand_features(compact), padded)
    assert torch.equal(expand_features(compact, dtype=torch.float32), padded.float())
    assert "pad_values" in compact  # the batch is left as it was
    reference = WhisperFeatureExtractor(feature_size=80)(list(audios), sampling_rate=16000,
                                                         return_tensors="np").input_features  # [2, 80, 3000]
    np.testing.assert_allclose(padded[:2].float().numpy(), reference, atol=2e-3)


def test_spec_augment_masks_are_bands_no_wider_than_their_limits(tiny_processor):
    """One time and one frequency mask per clip, widths drawn in [0, limit]: over 200 clips no band
    is wider than its limit, and the limit itself is reached (the draw covers the whole range)."""
    rng, frames, fill = np.random.default_rng(0), 100, -0.25
    limits = SpecAugment(time_masks=1, time_width=10, freq_masks=1, freq_width=6)
    collate = Collator(tiny_processor.tokenizer, spec_augment=limits, seed=1)
    widths = []
    for i in range(200):
        mel = rng.uniform(-1, 1, size=(80, frames)).astype(np.float16)
        sample = {"__key__": f"k{i}", "mel": mel, "json": {"captions": ["x"], "pad_value": fill}}
        masked = collate([sample])["input_features"][0, :, :frames].numpy() == np.float16(fill)  # [80, frames]
        cols, rows = np.flatnonzero(masked.all(axis=0)), np.flatnonzero(masked.all(axis=1))
        for band in (cols, rows):  # one contiguous band each (or none)
            assert len(band) == 0 or band[-1] - band[0] + 1 == len(band), (i, band)
        widths.append((len(cols), len(rows)))
    assert max(w[0] for w in widths) == limits.time_width and max(w[1] for w in widths) == limits.freq_width


def test_labels_are_tokenizer_ids_without_start_and_padded_by_length(tiny_processor):
    tok = tiny_processor.tokenizer
    captions = ["A dog barks.", "Rain falls on a tin roof while thunder rolls far away."]
    samples = [clip_sample(f"k{i}", 1.0, [c])[0] for i, c in enumerate(captions)]
    samples.append({"__key__": "", "__pad__": True})
    batch = Collator(tok, train=False)(samples)
    labels = batch["labels"]
    assert labels.dtype == torch.int64
    for row, caption in zip(labels, captions):
        ids = tok(caption).input_ids
        assert ids[:4] == [50258, 50259, 50358, 50363] and ids[-1] == 50257
        expected = ids[1:] + [-100] * (labels.shape[1] - len(ids) + 1)
        assert row.tolist() == expected  # the end-of-text (= pad id) is kept as a target
    assert (labels[2] == -100).all() and batch["is_pad"].tolist() == [False, False, True]
    assert batch["keys"] == ["k0", "k1", ""] and batch["captions"][2] == [] and batch["meta"][2] == {}


def test_hf_loss_with_these_labels_is_the_manual_cross_entropy(tiny_processor):
    tok = tiny_processor.tokenizer
    samples = [clip_sample("a", 1.0, ["A dog barks."])[0], clip_sample("b", 2.0, ["Birds sing at dawn in a park."])[0]]
    batch = Collator(tok, train=False)(samples)
    model = load_model("tiny", tiny_processor).eval()
    feats, labels = batch["input_features"].float(), batch["labels"]
    with torch.no_grad():
        loss = model(input_features=feats, labels=labels).loss
        decoder_input_ids = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
        assert decoder_input_ids[:, :2].tolist() == [[50258, 50259]] * 2  # start once, then <|en|>
        logits = model(input_features=feats, decoder_input_ids=decoder_input_ids).logits  # [B, T, V]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, manual)


def test_label_widths_are_a_few_and_the_loss_is_the_hf_loss_of_the_unpadded_batch(tiny_processor):
    """Captions of 1 to 57 words (label rows of 5 to 61 tokens) give at most 5 label widths (16, 24,
    32, 48, 64; one per row length before), and the rounded batch, a short one filled with a padding
    row, gives exactly the HF model's own loss on the unpadded labels (its own right shift)."""
    tok = tiny_processor.tokenizer
    collate = Collator(tok, train=False)
    widths = {collate([clip_sample("k", 0.5, [" ".join(["word"] * n)])[0]])["labels"].shape[1] for n in range(1, 58)}
    assert widths == {16, 24, 32, 48, 64} and widths <= set(LABEL_WIDTHS)
    assert collate([{"__key__": "", "__pad__": True}])["labels"].shape[1] == 16  # padding only: the smallest
    assert Collator(tok, train=False, max_label_tokens=20)(
        [clip_sample("k", 0.5, [" ".join(["word"] * 14)])[0]])["labels"].shape[1] == 20  # 18 tokens: the limit

    captions = ["A dog barks.", "Birds sing at dawn in a park.", "Rain."]
    samples = [clip_sample(f"k{i}", 1.0 + i, [c], 300.0 + 100 * i)[0] for i, c in enumerate(captions)]
    batch = Collator(tok, train=True, full_batches=True, batch_size=4)(samples)
    assert batch["labels"].shape == (4, 16) and batch["is_pad"].tolist() == [False, False, False, True]
    ids = [tok(c).input_ids[1:] for c in captions]
    longest = max(map(len, ids))
    unpadded = torch.tensor([row + [-100] * (longest - len(row)) for row in ids])  # [3, longest], as HF pads
    model = load_model("tiny", tiny_processor).eval()
    feats = batch["input_features"].float()
    with torch.no_grad():
        ours = model(input_features=feats, decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]).loss
        hf = model(input_features=feats[:3], labels=unpadded).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


def test_full_batches_fill_a_short_batch_with_padding_rows(tiny_processor):
    """A short (last) batch gets padding rows up to batch_size: no captions, all -100, key ""."""
    samples = [clip_sample(f"k{i}", 0.5, ["A dog barks."])[0] for i in range(3)]
    full = Collator(tiny_processor.tokenizer, full_batches=True, batch_size=5)(samples)
    assert full["input_features"].shape[0] == 5 and full["keys"] == ["k0", "k1", "k2", "", ""]
    assert full["is_pad"].tolist() == [False] * 3 + [True] * 2 and (full["labels"][3:] == -100).all()
    assert full["captions"][3:] == [[], []] and full["longest_caption_tokens"] == len(full["labels"][0][
        full["labels"][0] != -100]) - 3
    assert Collator(tiny_processor.tokenizer, batch_size=5)(samples)["input_features"].shape[0] == 3  # off: as read


def test_varied_captions_and_a_short_last_batch_compile_one_graph(tiny_processor):
    """torch.compile (dynamo, counting backend) of the training forward over batches whose longest
    captions differ (rows of 5 to 15 tokens) and a short last batch compiles once: one shape."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    collate = Collator(tiny_processor.tokenizer, full_batches=True, batch_size=2)
    batches = [collate([clip_sample(f"k{n}", 0.5, [" ".join(["word"] * n)])[0],
                        clip_sample(f"j{n}", 0.5, ["Rain."])[0]]) for n in (1, 6, 11)]
    batches.append(collate([clip_sample("last", 0.5, ["word " * 4])[0]]))
    model = load_model("tiny", tiny_processor).eval()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    try:
        frames = []
        for batch in batches:
            with torch.no_grad():
                compiled(input_features=batch["input_features"].float(), decoder_input_ids=batch["decoder_input_ids"],
                         use_cache=False)
            frames.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert frames == [frames[0]] * len(batches), frames


def test_a_sources_prefix_is_the_prompt_and_masked_in_the_labels(tiny_processor):
    """The prefix follows the task tokens in the decoder input, as the tokenizer writes the text
    "prefix caption"; the HF loss on those inputs counts the caption tokens only."""
    tok = tiny_processor.tokenizer
    prefix, caption, other = "clotho > caption:", "A dog barks.", "Birds sing at dawn in a park."
    tagged = dict(clip_sample("a", 1.0, [caption])[0], **{SOURCE_KEY: "clotho"})
    samples = [tagged, clip_sample("b", 2.0, [other])[0], {"__key__": "", "__pad__": True}]
    batch = Collator(tok, train=False, prefixes=(("clotho", f" {prefix} "), ("macs", "macs > caption:")))(samples)
    assert batch["sources"] == ["clotho", "default", "default"]
    whole = tok(f"{prefix} {caption}").input_ids  # <|startoftranscript|> ... <|endoftext|>
    given = len(tok.encode(prefix, add_special_tokens=False))
    width = batch["labels"].shape[1]
    assert batch["decoder_input_ids"][0].tolist() == whole[:-1] + [tok.pad_token_id] * (width - len(whole) + 1)
    assert batch["labels"][0].tolist() == (whole[1:4] + [-100] * given + whole[4 + given:]
                                           + [-100] * (width - len(whole) + 1))
    plain = tok(other).input_ids  # no prefix for the default source: as before
    assert batch["labels"][1].tolist() == plain[1:] + [-100] * (width - len(plain) + 1)
    assert batch["decoder_input_ids"][1, :len(plain) - 1].tolist() == plain[:-1]

    model = load_model("tiny", tiny_processor).eval()
    feats = batch["input_features"].float()
    with torch.no_grad():
        loss = model(input_features=feats, decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]).loss
        logits = model(input_features=feats[:1], decoder_input_ids=torch.tensor([whole[:-1]])).logits[0]  # [T, V]
        other_logits = model(input_features=feats[1:2], decoder_input_ids=torch.tensor([plain[:-1]])).logits[0]
    targets = [(t, whole[t + 1]) for t in range(len(whole) - 1) if not 3 <= t < 3 + given]
    manual = torch.cat([logits[[t for t, _ in targets]], other_logits])
    expected = F.cross_entropy(manual, torch.tensor([w for _, w in targets] + plain[1:]), reduction="mean")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_the_longest_caption_is_counted_as_the_tokenizer_writes_it_prefix_and_task_left_out(tiny_processor):
    """What ``max_new_tokens`` must allow to write the batch's longest caption: its tokens after the
    task tokens (and after the prefix, which is forced), the end token included."""
    tok = tiny_processor.tokenizer
    prefix, short, longer = "clotho > caption:", "A dog barks.", "Birds sing at dawn in a quiet park, far away."
    task = len(tok("").input_ids) - 1  # <|startoftranscript|><|en|><|translate|><|notimestamps|>, no end token
    given = len(tok.encode(prefix, add_special_tokens=False))
    pad = {"__key__": "", "__pad__": True}
    collate = Collator(tok, train=False, prefixes=(("clotho", prefix),))

    def tagged(key: str, caption: str) -> dict:
        return dict(clip_sample(key, 1.0, [caption])[0], **{SOURCE_KEY: "clotho"})

    prefixed = collate([tagged("a", longer), clip_sample("b", 1.0, [short])[0], pad])
    assert prefixed["longest_caption_tokens"] == len(tok(f"{prefix} {longer}").input_ids) - task - given
    plain = collate([tagged("a", short), clip_sample("b", 1.0, [longer])[0]])
    assert plain["longest_caption_tokens"] == len(tok(longer).input_ids) - task
    assert collate([pad, pad])["longest_caption_tokens"] == 0
    with pytest.warns(UserWarning, match="cut to max_label_tokens=8"):
        cut = Collator(tok, train=False, max_label_tokens=8)([clip_sample("c", 1.0, [longer])[0]])
    assert cut["longest_caption_tokens"] == 8 - (task - 1) == (cut["labels"][0] != -100).sum() - (task - 1)


def test_normalized_captions_are_the_targets_references_stay(tiny_processor):
    assert normalize_caption("A Rock-and-roll band,  playing \"LOUD\" music!") == "a rock and roll band playing loud music"
    assert normalize_caption("The dog's bark... echoes; (far away)?") == "the dogs bark echoes far away"
    tok = tiny_processor.tokenizer
    sample = clip_sample("a", 1.0, ["A Dog barks, LOUDLY!"])[0]
    batch = Collator(tok, train=False, normalize_captions=True)([sample])
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == tok("a dog barks loudly").input_ids[1:]
    assert batch["captions"] == [["A Dog barks, LOUDLY!"]]


def test_long_captions_are_cut_with_a_warning(tiny_processor):
    sample = clip_sample("long", 1.0, [" ".join(["word"] * 60)])[0]
    with pytest.warns(UserWarning, match="'long' has .* cut to max_label_tokens=16"):
        labels = Collator(tiny_processor.tokenizer, max_label_tokens=16)([sample])["labels"]
    assert labels.shape == (1, 16)
    ids = tiny_processor.tokenizer(sample["json"]["captions"][0]).input_ids
    assert labels[0].tolist() == ids[1:16] + [50257]  # cut, but still ends with <|endoftext|>


def test_caption_draw_is_seeded_per_epoch_and_eval_keeps_all(tiny_processor):
    tok = tiny_processor.tokenizer
    caps = [f"caption number {i}" for i in range(6)]
    samples = [clip_sample(f"k{i}", 0.5, caps)[0] for i in range(8)]
    train = Collator(tok, train=True, seed=1)

    def drawn(batch):
        return [tok.decode(row[row != -100][3:-1]).strip() for row in batch["labels"]]

    epoch0, epoch0_again = drawn(train(samples, epoch=0)), drawn(train(samples[::-1], epoch=0))[::-1]
    assert epoch0 == epoch0_again  # independent of the order in the batch
    assert epoch0 != drawn(train(samples, epoch=1)) and set(epoch0) <= set(caps) and len(set(epoch0)) > 1
    evaluation = Collator(tok, train=False)(samples)
    assert drawn(evaluation) == [caps[0]] * 8 and evaluation["captions"] == [caps] * 8


def test_spec_augment_is_seeded_off_by_default_and_fills_pad_value(tiny_processor):
    sample = clip_sample("k", 2.0, ["x"])[0]
    pad_value = sample["json"]["pad_value"]
    plain = Collator(tiny_processor.tokenizer)([sample])["input_features"][0]
    np.testing.assert_array_equal(plain.numpy(), pad_mel(sample["mel"], pad_value))
    options = SpecAugment(time_masks=2, time_width=50, freq_masks=2, freq_width=10)
    augment = Collator(tiny_processor.tokenizer, spec_augment=options, seed=4)
    first, again = augment([sample], epoch=0)["input_features"][0], augment([sample], epoch=0)["input_features"][0]
    other = augment([sample], epoch=1)["input_features"][0]
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, plain)
    changed = first != plain
    assert (first[changed] == torch.tensor(pad_value, dtype=torch.float16)).all()
    assert not changed[:, sample["mel"].shape[1]:].any()  # the padded tail already is pad_value
    evaluation = Collator(tiny_processor.tokenizer, train=False, spec_augment=options)([sample])["input_features"][0]
    assert torch.equal(evaluation, plain)


@pytest.fixture(scope="module")
def openai_encoding():
    """openai-whisper's own tokenizer (tiktoken, the same ranks and split), with no special token:
    the reference ids of any text read as plain text."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from pipeline.model import SPLIT_PATTERN, TIKTOKEN_FILE

    return tiktoken.Encoding("whisper-plain", pat_str=SPLIT_PATTERN, special_tokens={},
                             mergeable_ranks=load_tiktoken_bpe(str(TIKTOKEN_FILE)))


@pytest.fixture(scope="module")
def hub_like_tokenizer(tmp_path_factory, tiny_processor):
    """The built-in tokenizer with the timestamps as *non-special* added tokens, as the Hub's Whisper
    tokenizers have them (``WhisperTokenizer``: ``timestamp_begin = all_special_ids[-1] + 1``)."""
    import json

    from transformers import WhisperTokenizer

    from pipeline.model import builtin_tokenizer_file

    data = json.loads(builtin_tokenizer_file().read_text())
    for token in data["added_tokens"]:
        token["special"] = not (token["content"].startswith("<|") and token["content"][2:3].isdigit())
    path = tmp_path_factory.mktemp("hub") / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok = tiny_processor.tokenizer
    return WhisperTokenizer(tokenizer_file=str(path), language="en", task="translate", predict_timestamps=False,
                            unk_token=tok.eos_token, bos_token=tok.eos_token, eos_token=tok.eos_token,
                            pad_token=tok.eos_token)


@pytest.mark.parametrize("which", ["builtin", "hub_like"])
def test_special_token_spellings_in_captions_and_prefixes_stay_text(which, tiny_processor, hub_like_tokenizer,
                                                                    openai_encoding):
    """A scraped caption or a prefix holding ``<|endoftext|>``, ``<|notimestamps|>``, a language tag
    or a timestamp is trained on (and prompted with) as the characters it is: exactly the ids
    openai-whisper's tokenizer gives that text with no special token, never a control token."""
    tok = tiny_processor.tokenizer if which == "builtin" else hub_like_tokenizer
    if which == "hub_like":  # what makes it hub-like: split_special_tokens leaves its timestamps whole
        assert 50364 in tok.encode("<|0.00|>", add_special_tokens=False, split_special_tokens=True)
    caption = "A dog <|endoftext|> barks<|notimestamps|> at <|0.00|> then <|en|><|translate|> stops."
    prefix = "site <|startoftranscript|> says:"
    specials = set(tok.added_tokens_decoder)  # every control token: <|endoftext|> … the timestamps
    tagged = dict(clip_sample("a", 1.0, [caption])[0], **{SOURCE_KEY: "web"})
    batch = Collator(tok, train=False, prefixes=(("web", prefix),))([tagged, clip_sample("b", 1.0, [caption])[0]])
    task = tok.prefix_tokens[1:]  # <|en|><|translate|><|notimestamps|>
    expected = [task + openai_encoding.encode_ordinary(prefix) + openai_encoding.encode_ordinary(f" {caption}"),
                task + openai_encoding.encode_ordinary(caption)]
    given = len(openai_encoding.encode_ordinary(prefix))
    for row, inputs, want, prompt in zip(batch["labels"], batch["decoder_input_ids"], expected, (given, 0)):
        row = row[row != -100].tolist()
        assert row == want[:3] + want[3 + prompt:] + [tok.eos_token_id]
        assert not specials & set(want[3:]) and inputs[1:len(want)].tolist() == want[:-1]
    assert prompt_ids(tok, f" {prefix} ") == openai_encoding.encode_ordinary(prefix)  # inference's --prefix


def test_a_prefix_without_room_for_a_caption_names_its_tokens_and_the_limit(tiny_processor):
    """Found when the collator is made (the trainer's start), one line, a config error (exit 2)."""
    tok = tiny_processor.tokenizer
    long = "x" * 2000  # 1000 tokens
    with pytest.raises(ConfigError) as info:
        Collator(tok, prefixes=((DEFAULT_SOURCE, long),))
    assert str(info.value) == (f"data_config.caption_prefix is {len(prompt_ids(tok, long))} tokens: at most "
                               f"{MAX_TARGET_POSITIONS - 5} fit, leaving a caption token and the end token within "
                               f"max_label_tokens={MAX_TARGET_POSITIONS} (3 task tokens before it)")
    with pytest.raises(ConfigError, match=r"^the prefix of data_config.train_sources 'web' is 8 tokens: at most 7 fit"):
        Collator(tok, max_label_tokens=12, prefixes=(("web", "one two three four five six seven eight"),))
    room = Collator(tok, max_label_tokens=12, prefixes=(("web", "one two three four five six seven"),))
    tagged = dict(clip_sample("a", 1.0, ["A dog barks."])[0], **{SOURCE_KEY: "web"})
    with pytest.warns(UserWarning, match="cut to max_label_tokens=12"):
        labels = room([tagged])["labels"][0]
    assert labels.tolist()[-2:] == [tok.encode(" A", add_special_tokens=False)[0], tok.eos_token_id]


def test_labels_fit_the_decoders_positions_at_the_largest_max_label_tokens(tiny_processor):
    """``max_label_tokens`` counts the whole decoder row (task tokens, prefix, caption, end token):
    at its largest, MAX_TARGET_POSITIONS, a long caption still fits the model; one more is refused."""
    tok = tiny_processor.tokenizer
    sample = dict(clip_sample("long", 1.0, [" ".join(["word"] * 600)])[0], **{SOURCE_KEY: "web"})
    with pytest.warns(UserWarning, match="cut to max_label_tokens=448"):
        batch = Collator(tok, prefixes=(("web", "a prefix:"),))([sample])
    assert batch["labels"].shape[1] == batch["decoder_input_ids"].shape[1] == MAX_TARGET_POSITIONS
    model = load_model("tiny", tiny_processor).eval()
    with torch.no_grad():
        model(input_features=batch["input_features"].float(), decoder_input_ids=batch["decoder_input_ids"],
              labels=batch["labels"])
    with pytest.raises(ValueError, match=f"max_label_tokens=449: must be at most {MAX_TARGET_POSITIONS}"):
        Collator(tok, max_label_tokens=MAX_TARGET_POSITIONS + 1)


def test_spec_augment_time_masks_stay_within_each_clips_own_frames_in_a_mixed_batch(tiny_processor):
    """A short clip batched with a long one gets exactly the masks it gets alone, drawn over its own
    frames (widths and starts), not over the batch's longest: on many keys some are masked."""
    options = SpecAugment(time_masks=2, time_width=50, freq_masks=0, freq_width=0)
    collate = Collator(tiny_processor.tokenizer, spec_augment=options, seed=3)
    long = clip_sample("long", 4.0, ["x"])[0]
    masked = 0
    for i in range(12):
        short = clip_sample(f"short{i}", 0.3, ["y"], freq=300.0 + 50 * i)[0]
        frames, fill = short["mel"].shape[1], np.float16(short["json"]["pad_value"])
        assert frames < 50 < long["mel"].shape[1]
        alone = collate([short])["input_features"][0]
        mixed = collate([long, short])["input_features"][1]
        assert torch.equal(mixed, alone), i
        plain = torch.from_numpy(pad_mel(short["mel"], short["json"]["pad_value"]))
        cols = torch.nonzero((mixed != plain).any(dim=0)).flatten()
        assert (mixed[:, cols] == torch.tensor(fill)).all() and (cols < frames).all()
        masked += len(cols) > 0
    assert masked >= 9  # widths are drawn in [0, frames]: most draws mask something
