"""Per-step hyperparameter schedules of nanochat's training scripts, as pure functions of the step.

The training loop evaluates them on the host each step and hands the numbers to `jaxchat.optim.set_hparams`
(float32 scalars in the optimizer state, so the jitted step never recompiles):

    opt_state = set_hparams(opt_state, lrm=lr_multiplier(step, num_iterations),
                            momentum=muon_momentum(step, num_iterations),
                            weight_decay=muon_weight_decay(step, num_iterations, weight_decay_scaled))

Sources: nanochat scripts/base_train.py (`get_lr_multiplier`, `get_muon_momentum`, `get_weight_decay`),
scripts/chat_sft.py and scripts/chat_rl.py (their `get_lr_multiplier` / `get_muon_momentum`).
"""

from __future__ import annotations

import math


def _check(step: int, num_iterations: int) -> None:
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Pretraining lr multiplier: linear warmup, constant 1, linear warmdown to final_lr_frac.

    (step + 1) / warmup_steps while step < warmup_steps; 1.0 up to step num_iterations - W with
    W = round(warmdown_ratio * num_iterations); then p + (1 - p) * final_lr_frac with p = (num_iterations - step) / W,
    reaching final_lr_frac at step == num_iterations. Defaults are base_train.py's flags
    (--warmup-steps 40, --warmdown-ratio 0.65, --final-lr-frac 0.05).
    Raises ValueError for a negative step or num_iterations <= 0.
    """
    _check(step, num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float = 0.65) -> float:
    """Pretraining Muon momentum: 0.85 -> 0.97 linearly over steps 0..400, 0.97 until the lr warmdown starts, then
    0.97 -> 0.90 linearly over the warmdown (the first rule wins for steps < 400, even inside a warmdown)."""
    _check(step, num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Muon weight decay: cosine from `weight_decay` at step 0 to 0 at num_iterations,
    weight_decay * (1 + cos(pi * step / num_iterations)) / 2. base_train passes its batch/horizon-scaled value."""
    _check(step, num_iterations)
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def sft_lr_multiplier(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                      final_lr_frac: float = 0.0) -> float:
    """SFT lr multiplier over training progress in [0, 1] (chat_sft.py): warmup (progress + 1e-8) / warmup_ratio,
    then 1, then linear to final_lr_frac over the last warmdown_ratio. Multiply by --init-lr-frac (0.8) for lrm."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) * 1.0 + decay * final_lr_frac


def sft_muon_momentum(step: int) -> float:
    """SFT Muon momentum (chat_sft.py): 0.85 -> 0.95 linearly over the first 300 steps, then 0.95."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def rl_lr_multiplier(step: int, num_steps: int) -> float:
    """RL lr multiplier (chat_rl.py): 1 - step / num_steps. Multiply by --init-lr-frac (0.05) for lrm."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    return 1.0 - step / num_steps
