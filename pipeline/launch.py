"""One ``Accelerator`` set-up for training and inference, right on machines without a GPU too.

accelerate 1.15 sets up a CPU process group (gloo) only when told ``cpu=True``. Under
``accelerate launch --multi_gpu`` or ``torchrun`` on a machine without CUDA, a plain ``Accelerator()``
leaves every process alone: each would train its own copy, or caption its share as if it were all.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


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
    return accelerator
