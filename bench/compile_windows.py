"""How many graphs ``torch.compile`` makes of a model whose encoder windows vary (issue 23).

    python bench/compile_windows.py [--windows 500 1000 500 1500 1000 3000]

Runs the built-in tiny Whisper (fitted encoder, CPU) compiled, one forward per window, and prints
each call's time and dynamo's graph count: windows take few values, so the count should stop growing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[500, 1000, 500, 1500, 1000, 3000])
    args = parser.parse_args()
    import torch
    from torch._dynamo.utils import counters

    from pipeline.model import load_model, load_processor

    torch.set_num_threads(1)
    tokenizer = load_processor("tiny").tokenizer
    compiled = torch.compile(load_model("tiny").eval())
    ids = torch.tensor([tokenizer.prefix_tokens])
    print("| window (frames) | seconds | graphs so far |\n|---|---|---|")
    for frames in args.windows:
        start = time.perf_counter()
        with torch.no_grad():
            compiled(input_features=torch.randn(1, 80, frames), decoder_input_ids=ids)
        print(f"| {frames} | {time.perf_counter() - start:.1f} | {counters['stats']['unique_graphs']} |", flush=True)


if __name__ == "__main__":
    main()
