"""The learning rate as a pure function of the step, so a resumed run sets exactly the rate the
uninterrupted run used (nothing to checkpoint beyond the step itself).

    lr = lr_at(step, base_lr, schedule="constant"|"cosine", warmup_steps=W, total_steps=S)

`step` is the 0-based index of the optimizer step about to be taken. Warmup is linear from base/W (step 0)
to base (step W-1); after it the rate stays at base (constant, the official REPA setting: 1e-4, no warmup)
or follows a half cosine from base to 0 at step S (cosine).
"""
import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base_lr: float, schedule: str = "constant", warmup_steps: int = 0,
          total_steps: int = 1) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule={schedule!r}: expected one of {SCHEDULES}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
