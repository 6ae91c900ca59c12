"""Helpers for tests/test_infer.py: an input-sensitive tiny checkpoint, reference captions from the HF
model's own ``generate``, shard contents read with plain ``tarfile``, and a loopback HTTP server.

The built-in ``tiny`` model's random weights are so small that it writes the same caption for every
input, which would make "predictions equal generate on these features" hold for any features. The
checkpoint here re-draws the weights (std 0.2) so that different clips get different captions while
float16 rounding of the features (~5e-4) does not change them.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import torch

from shard_tools.features import pad_mel
from pipeline.model import LANGUAGE, TASK, load_model, load_processor, save_model


def write_sensitive_tiny(directory: Path, std: float = 0.2, seed: int = 1) -> Path:
    processor = load_processor("tiny")
    model = load_model("tiny", processor)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed_positions" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.02 if "embed_tokens" in name else std))
    save_model(model, processor, directory)
    return directory


def reference_captions(model_dir: Path, features: torch.Tensor, **generate_kwargs) -> list[str]:
    """``features [N, n_mels, frames]`` captioned by ``WhisperForConditionalGeneration.generate``; a
    window shorter than 30 s goes in as the encoder's output (``generate`` pads features to 30 s)."""
    processor = load_processor(str(model_dir))
    model = load_model(str(model_dir), processor).eval()
    with torch.inference_mode():
        inputs = ({"input_features": features.float()} if features.shape[-1] == 3000
                  else {"encoder_outputs": model.get_encoder()(features.float())})
        tokens = model.generate(**inputs, language=LANGUAGE, task=TASK, do_sample=False, **generate_kwargs)
    return [c.strip() for c in processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def read_shards(paths: list[str]) -> tuple[list[str], torch.Tensor, list[list[str]]]:
    """``(keys, padded features [N, n_mels, 3000] float16, captions)`` read with plain tarfile."""
    members = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    keys = sorted(members)
    metas = [json.loads(members[k]["json"]) for k in keys]
    mels = [np.load(io.BytesIO(members[k]["mel.npy"]), allow_pickle=False) for k in keys]
    features = torch.stack([torch.from_numpy(pad_mel(m, meta["pad_value"])) for m, meta in zip(mels, metas)])
    return keys, features, [meta["captions"] for meta in metas]


@contextlib.contextmanager
def serve_directory(directory: Path):
    """``http://127.0.0.1:PORT`` serving ``directory`` from a thread, for the duration."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        pass  # one line per request on stderr would drown the test output
