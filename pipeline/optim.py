"""The optimizer and its schedule: fused AdamW, whose ``found_inf`` lets a training step be skipped on
the device (``train_stream.optimizer_step``), and the learning rate of each step as a pure function of
the step number (``lr_at``), so the schedule's state is the step a checkpoint holds."""

from __future__ import annotations

import math

import torch


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, conv, embeddings); none on biases and LayerNorm (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def make_optimizer(model, tc) -> torch.optim.Optimizer:
    """Fused AdamW over the trainable parameters (``param_groups``): one kernel for all of them, and
    a ``found_inf`` flag that skips a step on the device."""
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.learning_rate,
                             betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon, fused=True)


def lr_at(step: int, tc, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then linear/cosine/constant."""
    peak, warmup = tc.learning_rate, tc.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if tc.lr_scheduler_type == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if tc.lr_scheduler_type == "linear":
        return peak * (1.0 - progress)
    return peak


def next_lr(step: int, in_flight: torch.Tensor | None, tc, max_steps: int, device) -> torch.Tensor:
    """The learning rate of the step launched now, a device scalar: ``lr_at`` of its position, which
    is ``step`` (the steps applied), plus one if a step is in flight and its skip flag
    ``in_flight`` (on the device, not read here) is false."""
    lr = torch.full((), lr_at(step, tc, max_steps), dtype=torch.float32, device=device)
    return lr if in_flight is None else torch.where(in_flight, lr, lr_at(step + 1, tc, max_steps))


def set_lr(optimizer, lr: float | torch.Tensor) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
