"""Audio-captioning metrics: BLEU-1..4, ROUGE-L, CIDEr-D, METEOR, SPICE and SPIDEr.

The numbers come from ``pycocoevalcap`` on the toolkit's own PTB tokenisation (its jar called
directly); each metric is ``{"available": True, "value": x}`` or ``{"available": False, "reason": ...}``,
never dropped or faked. Details: docs/inference.md, "How the metrics are computed".
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = "pip install whisper-caption-stream[metrics]"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr")
# Metric groups a caller may ask for (the Java ones cost a JVM start: METEOR ~8 s).
GROUPS = {"bleu": ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"), "meteor": ("METEOR",), "rouge_l": ("ROUGE_L",),
          "cider_d": ("CIDEr_D",), "spice": ("SPICE", "SPIDEr")}
JAVA_TIMEOUT_S = 600

PTB_MAIN = "edu.stanford.nlp.process.PTBTokenizer"
# The toolkit's PUNCTUATIONS (tokenizer/ptbtokenizer.py), repeated so the pure-Python path works
# without pycocoevalcap; a test checks they agree.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def score(predictions: list[str], references: list[list[str]], metrics: tuple[str, ...] = tuple(GROUPS)) -> dict:
    """Corpus scores of ``predictions[i]`` against ``references[i]`` (one or more captions each).

    ``metrics`` selects groups from ``GROUPS`` (default: all); metrics not selected are reported
    unavailable ("not requested"). Returns ``{"num_clips", "tokenizer", "metrics": {name: {...}}}``.
    """
    _check_inputs(predictions, references)
    unknown = set(metrics) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown metric group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    result = {name: _unavailable(f"not requested (metric groups asked for: {', '.join(metrics)})")
              for name in METRICS}
    try:
        scorers = _import_scorers()
    except ImportError as error:
        return not_scored(len(predictions), f"pycocoevalcap is not installed ({error}): {INSTALL_HINT}")
    tokenizer, gts, res = tokenize_for_coco(predictions, references)
    if "bleu" in metrics:
        bleu, _ = scorers["Bleu"](4).compute_score(gts, res, verbose=0)
        result.update({f"BLEU_{n + 1}": _available(v) for n, v in enumerate(bleu)})
    if "rouge_l" in metrics:
        result["ROUGE_L"] = _available(scorers["Rouge"]().compute_score(gts, res)[0])
    if "cider_d" in metrics:
        result["CIDEr_D"] = _available(scorers["Cider"]().compute_score(gts, res)[0])
    if "meteor" in metrics:
        result["METEOR"] = _run_java_metric(scorers["Meteor"], gts, res)
    if "spice" in metrics:
        result["SPICE"] = _spice(scorers["Spice"], gts, res)
        result["SPIDEr"] = _spider(result["CIDEr_D"], result["SPICE"])
    return {"num_clips": len(predictions), "tokenizer": tokenizer, "metrics": result}


def not_scored(num_clips: int, reason: str) -> dict:
    """``score``'s result shape with every metric unavailable for ``reason``."""
    return {"num_clips": num_clips, "tokenizer": None, "metrics": {name: _unavailable(reason) for name in METRICS}}


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    for i, refs in enumerate(references):
        if not refs or isinstance(refs, str):
            raise ValueError(f"clip {i}: references must be a non-empty list of captions, got {refs!r}")


def _import_scorers() -> dict:
    """The toolkit's scorer classes; ImportError when the optional extra is missing."""
    import pycocoevalcap  # noqa: F401  (the package itself first, so a missing extra fails here)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.spice.spice import Spice

    return {"Bleu": Bleu, "Cider": Cider, "Meteor": Meteor, "Rouge": Rouge, "Spice": Spice}


def _available(value) -> dict:
    return {"available": True, "value": float(value)}


def _unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


def toolkit_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __file__


def java_problem() -> str | None:
    """Why Java tools cannot run here, or None when ``java`` is on PATH."""
    if shutil.which("java"):
        return None
    return "java is not on PATH (the toolkit's METEOR, SPICE and PTBTokenizer are Java)"


# ----------------------------------------------------------------------------------------------
# Tokenisation


def tokenize_for_coco(predictions: list[str], references: list[list[str]]) -> tuple[str, dict, dict]:
    """``(tokenizer description, gts, res)`` in the shape the toolkit's scorers take:
    ``gts[i]`` = tokenised references of clip ``i``, ``res[i]`` = ``[tokenised prediction]``."""
    flat = list(predictions) + [c for refs in references for c in refs]
    try:
        tokens = ptb_tokenize(flat)
        tokenizer = "PTBTokenizer (Stanford CoreNLP 3.4.1 on Java, as pycocoevalcap)"
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        tokens = [python_ptb_tokenize(c) for c in flat]
        tokenizer = f"python PTB approximation (Java PTBTokenizer unavailable: {error})"
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts, at = {}, len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[at:at + len(refs)]
        at += len(refs)
    return tokenizer, gts, res


def ptb_tokenize(captions: list[str]) -> list[str]:
    """The toolkit's tokenisation (``java ... PTBTokenizer -preserveLines -lowerCase``, then
    punctuation tokens dropped), one output line per caption."""
    problem = java_problem()
    if problem:
        raise RuntimeError(problem)
    jar = toolkit_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    text = "\n".join(c.replace("\n", " ") for c in captions)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text(text, encoding="utf-8")
        proc = subprocess.run(["java", "-cp", str(jar), PTB_MAIN, "-preserveLines", "-lowerCase",
                               "-encoding", "UTF-8", str(path)],
                              capture_output=True, check=True, timeout=JAVA_TIMEOUT_S)
    lines = proc.stdout.decode("utf-8").split("\n")[:len(captions)]
    if len(lines) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in lines]


# The pure-Python fallback: PTB's common cases for captions (lower case; clitics 's 're 've 'm 'll 'd
# n't split off; brackets as -lrb- ...; numbers, abbreviations and hyphenated words kept whole;
# other punctuation split off) and then the toolkit's punctuation removal. Rarer PTB rules are not
# reproduced (e.g. PTB keeps "?!" as one token, which the toolkit then does not drop).
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")
_TOKEN = re.compile(r"(?:[a-z]\.){2,}|\w+(?:[-./:,&']\w+)*|n't|'\w+|\.\.\.|--|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = {'"', "“", "”", "‘", "’"}  # PTB turns these into `` '' ` ', which the toolkit drops


def python_ptb_tokenize(caption: str) -> str:
    """A documented pure-Python approximation of the toolkit's PTB tokenisation (no Java)."""
    text = _CLITIC.sub(r" \1", caption.replace("\n", " ").lower())
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t not in _QUOTES)


# ----------------------------------------------------------------------------------------------
# The Java metrics


def _run_java_metric(scorer_cls, gts: dict, res: dict) -> dict:
    problem = java_problem()
    if problem:
        return _unavailable(problem)
    try:
        scorer = scorer_cls()
        value = scorer.compute_score(gts, res)[0]
    except Exception as error:  # a JVM failure has many shapes (no memory, EOF, bad output): report it
        return _unavailable(f"{scorer_cls.__name__} failed on Java: {type(error).__name__}: {error}")
    return _available(value)


def _spice(spice_cls, gts: dict, res: dict) -> dict:
    corenlp = toolkit_dir() / "spice" / "lib" / "stanford-corenlp-3.6.0.jar"
    if not corenlp.exists():
        return _unavailable(f"needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use; not "
                            f"installed in {corenlp.parent} and scoring never downloads. Once, with network: "
                            f"python -m pycocoevalcap.spice.get_stanford_models")
    return _run_java_metric(spice_cls, gts, res)


def _spider(cider: dict, spice: dict) -> dict:
    for name, entry in (("SPICE", spice), ("CIDEr-D", cider)):
        if not entry["available"]:
            return _unavailable(f"mean(CIDEr-D, SPICE) needs {name}, which is unavailable (see {name})")
    return _available((cider["value"] + spice["value"]) / 2)


def format_table(scores: dict) -> str:
    """A printable two-column table of ``score``'s result."""
    rows = [f"{'metric':<9} value", f"{'-' * 9} {'-' * 8}"]
    for name, entry in scores["metrics"].items():
        rows.append(f"{name:<9} {entry['value']:.4f}" if entry["available"]
                    else f"{name:<9} n/a      ({entry['reason']})")
    rows.append(f"{scores['num_clips']} clips scored; tokenizer: {scores['tokenizer']}")
    return "\n".join(rows)
