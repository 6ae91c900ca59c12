"""pipeline.metrics against pycocoevalcap's own tokenizer and scorers, and against hand-computed values."""

from __future__ import annotations

import math
import shutil
import sys

import pytest

from pipeline import metrics

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH")

PREDICTIONS = ["A dog barks while rain falls.", "Birds are singing (loudly) in the trees!", "a car passes by",
               "Someone's typing on a keyboard, then stops.", ""]
REFERENCES = [["A dog is barking in the rain.", "Rain falls, and a dog barks."],
              ["Birds sing in the trees.", "Many birds chirp loudly.", "Birdsong outdoors"],
              ["A car drives past on a wet road."],
              ["A person types on a keyboard.", "Keyboard typing then silence."],
              ["Water drips slowly."]]


def _values(result: dict) -> dict:
    return {k: v["value"] for k, v in result["metrics"].items() if v["available"]}


def test_identical_captions_score_one():
    caps = ["a dog barks in the rain", "birds sing loudly in the morning"]
    result = metrics.score(caps, [[c] for c in caps], metrics=("bleu", "rouge_l"))
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"):
        assert result["metrics"][name]["value"] == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_bleu1_and_rouge_l():
    # "a dog" vs "a dog barks loudly": unigram precision 1, brevity penalty exp(1 - 4/2);
    # ROUGE-L with LCS 2: P = 1, R = 0.5, F_beta(1.2) = (1 + 1.44) * 0.5 / (0.5 + 1.44).
    result = metrics.score(["a dog"], [["a dog barks loudly"]], metrics=("bleu", "rouge_l"))
    assert result["metrics"]["BLEU_1"]["value"] == pytest.approx(math.exp(-1), abs=1e-6)
    assert result["metrics"]["ROUGE_L"]["value"] == pytest.approx(2.44 * 0.5 / 1.94, abs=1e-9)


def test_unrequested_metrics_are_reported_not_dropped():
    result = metrics.score(["a dog"], [["a dog barks"]], metrics=("cider_d",))
    assert set(result["metrics"]) == set(metrics.METRICS)
    assert result["metrics"]["CIDEr_D"]["available"]
    assert "not requested" in result["metrics"]["BLEU_1"]["reason"]
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score(["a"], [["a"]], metrics=("bleurt",))


@needs_java
def test_matches_pycocoevalcap_scorers_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    expected = {"BLEU_1": bleu[0], "BLEU_2": bleu[1], "BLEU_3": bleu[2], "BLEU_4": bleu[3],
                "ROUGE_L": Rouge().compute_score(gts, res)[0], "CIDEr_D": Cider().compute_score(gts, res)[0],
                "METEOR": Meteor().compute_score(gts, res)[0]}

    result = metrics.score(PREDICTIONS, REFERENCES)
    assert result["tokenizer"].startswith("PTBTokenizer")
    assert _values(result) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected["CIDEr_D"] and 0 < expected["METEOR"] < 1  # a non-degenerate fixture
    spice, spider = result["metrics"]["SPICE"], result["metrics"]["SPIDEr"]
    if not spice["available"]:  # no CoreNLP 3.6.0 here: reported with the reason, SPIDEr with it
        assert "CoreNLP" in spice["reason"] and "needs SPICE" in spider["reason"]


@needs_java
def test_python_tokenizer_agrees_with_ptb_on_typical_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

    assert metrics.PUNCTUATIONS == frozenset(PUNCTUATIONS)
    captions = PREDICTIONS + [c for refs in REFERENCES for c in refs] + [
        "A well-known dog's bark, 3.5 times -- \"loud\" [x] {y}; don't we're I'm can't",
        "Cars honk & people talk at 5:30 p.m. in the U.S., e.g. 10,000 birds... yes?",
        "It's raining; water-drops hit the roof/window"]
    toolkit = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert metrics.ptb_tokenize(captions) == [toolkit[i][0] for i in range(len(captions))]
    assert [metrics.python_ptb_tokenize(c) for c in captions] == [toolkit[i][0] for i in range(len(captions))]


def test_without_java_falls_back_and_reports(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    result = metrics.score(PREDICTIONS[:2], REFERENCES[:2], metrics=("bleu", "meteor"))
    assert result["tokenizer"].startswith("python PTB approximation")
    assert "java is not on PATH" in result["metrics"]["METEOR"]["reason"]
    assert result["metrics"]["BLEU_1"]["available"]


def test_missing_extra_reports_every_metric_unavailable(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    result = metrics.score(["a dog"], [["a dog barks"]])
    assert set(result["metrics"]) == set(metrics.METRICS)
    for entry in result["metrics"].values():
        assert not entry["available"] and metrics.INSTALL_HINT in entry["reason"]
    assert "n/a" in metrics.format_table(result)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="clip 1"):
        metrics.score(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.score([], [])
