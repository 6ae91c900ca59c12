"""``train_stream.main`` under ``accelerate launch`` for tests/test_train.py, with what the test needs
to see on every rank, written to ``OUT_DIR/rank-R.*``:

- ``rank-R.safetensors``: this rank's parameters at the end (only rank 0's are saved by the trainer);
- ``rank-R.json``: the keys of every micro-batch this rank trained on, in order.

``WCS_TEST_NAN_AT=R:N`` makes rank R's N-th micro-batch loss NaN (1-based), as a bad batch would.
``WCS_TEST_INF_GRAD_AT=R:N`` puts an inf into one gradient entry of rank R's N-th micro-batch, its loss finite.
``WCS_TEST_EVAL_ERROR=1`` makes evaluation raise, as a bug there would, after writing the time to
``OUT_DIR/eval-error-at``.

    python -m accelerate.commands.launch ... tests/_train_ranks.py OUT_DIR [train_stream arguments]
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch  # noqa: E402

import train_stream  # noqa: E402


def main(out: Path, argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    nan_rank, nan_call = (int(x) for x in os.environ.get("WCS_TEST_NAN_AT", "-1:-1").split(":"))
    inf_rank, inf_call = (int(x) for x in os.environ.get("WCS_TEST_INF_GRAD_AT", "-1:-1").split(":"))
    keys, real_make_loader, real_compute_loss = [], train_stream.make_loader, train_stream.compute_loss
    real_save_final, real_build_model = train_stream.save_final, train_stream.build_model

    def make_loader(*args, **kwargs):
        loader = real_make_loader(*args, **kwargs)
        if not kwargs.get("train"):
            return loader

        class Recorder:
            def __iter__(self):
                for batch in loader:
                    keys.append([k for k, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad])
                    yield batch

            def __len__(self):
                return len(loader)

            def __getattr__(self, name):
                return getattr(loader, name)
        return Recorder()

    def compute_loss(model, batch, device, **options):
        loss, tokens = real_compute_loss(model, batch, device, **options)
        return (loss * float("nan") if rank == nan_rank and len(keys) == nan_call else loss), tokens

    def build_model(cfg):
        processor, model = real_build_model(cfg)

        def inf_grad(grad):
            if rank == inf_rank and len(keys) == inf_call:
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
            return grad
        model.model.decoder.layers[0].fc1.weight.register_hook(inf_grad)
        return processor, model

    def save_final(model, processor, cfg, accelerator, output_dir, caption_tokens):
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        safetensors.torch.save_model(unwrapped, str(out / f"rank-{accelerator.process_index}.safetensors"))
        (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(
            {"world_size": accelerator.num_processes, "keys": keys}))
        return real_save_final(model, processor, cfg, accelerator, output_dir, caption_tokens)

    def evaluate(*args, **kwargs):
        (out / "eval-error-at").write_text(str(time.time()))
        raise RuntimeError("an error in evaluation")

    if os.environ.get("WCS_TEST_EVAL_ERROR"):
        train_stream.evaluate = evaluate
    train_stream.make_loader, train_stream.compute_loss = make_loader, compute_loss
    train_stream.save_final, train_stream.build_model = save_final, build_model
    return train_stream.main(argv)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
