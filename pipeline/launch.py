"""One ``Accelerator`` set-up for training and inference, right on machines without a GPU too: a gloo
process group under a multi-process launch, and fp16 autocast with a gradient scaler on the CPU, both
of which a plain ``Accelerator()`` leaves out there. Why: docs/training.md, "Several processes and
machines".
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The launcher and accelerate disagree on the number of processes."""


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(**kwargs)``, on gloo when launched as several processes without CUDA; checks
    that accelerate sees as many processes as were launched (``WORLD_SIZE``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=launched > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != launched:
        raise LaunchError(f"launched as {launched} processes (WORLD_SIZE) but accelerate set up "
                          f"{accelerator.num_processes}: check the accelerate launch options")
    if accelerator.device.type == "cpu" and accelerator.mixed_precision in ("fp16", "bf16"):
        if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
            accelerator.native_amp = True  # read by prepare(), autocast() and backward()
            accelerator.scaler = torch.amp.GradScaler("cpu")
        if accelerator.is_main_process:
            log.warning("%s on a CPU: autocast makes most CPU kernels slower than fp32; it is there to "
                        "check the mixed-precision path, not for speed", accelerator.mixed_precision)
    return accelerator
