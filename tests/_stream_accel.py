"""Two ranks under ``accelerate launch`` for tests/test_stream.py: each rank streams one epoch with
``make_loader`` (rank and world size from torch.distributed, no ``accelerator.prepare``) and writes
what it saw to ``OUT/rank{r}.json``; batch counts are also compared across ranks with
``accelerator.gather``."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from pipeline.model import load_processor  # noqa: E402
from pipeline.stream import make_loader  # noqa: E402


def main(urls: str, out: str, workers: int) -> None:
    accelerator = Accelerator(cpu=True)
    loader = make_loader(urls, load_processor("tiny").tokenizer, batch_size=3, num_workers=workers, seed=5)
    keys, sizes = [], []
    for batch in loader:
        keys += [k for k, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad]
        sizes.append(len(batch["keys"]))
    counts = accelerator.gather(torch.tensor([len(sizes)])).tolist()  # [world_size]
    result = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "len": len(loader),
              "sizes": sizes, "keys": keys, "gathered_batches": counts}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
