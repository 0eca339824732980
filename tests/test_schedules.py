"""jaxchat.schedules against nanochat's base_train / chat_sft / chat_rl schedules, expected values by hand."""

import math

import pytest

from jaxchat.schedules import (lr_multiplier, muon_momentum, muon_weight_decay, rl_lr_multiplier, sft_lr_multiplier,
                               sft_muon_momentum)

# A run of 1000 steps with base_train's defaults: warmup 40, warmdown round(0.65 * 1000) = 650 steps starting at
# step 350, final_lr_frac 0.05.
N = 1000


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 40),  # warmup: (step + 1) / 40
    (19, 20 / 40),
    (39, 1.0),
    (40, 1.0),  # plateau
    (350, 1.0),  # last plateau step: step <= N - 650
    (351, 649 / 650 + (1 / 650) * 0.05),  # warmdown: p = (N - step) / 650; p + (1 - p) * 0.05
    (675, 0.5 + 0.5 * 0.05),
    (999, 1 / 650 + (649 / 650) * 0.05),
    (1000, 0.05),  # end
])
def test_lr_multiplier(step, expected):
    assert lr_multiplier(step, N) == pytest.approx(expected, rel=1e-12)


def test_lr_multiplier_flags_and_errors():
    # warmdown_ratio=0.2 of 100 -> 20 steps from step 80; warmup 10; final 0.0
    assert lr_multiplier(4, 100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.0) == pytest.approx(0.5)
    assert lr_multiplier(80, 100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.0) == 1.0
    assert lr_multiplier(90, 100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_iterations"):
        lr_multiplier(0, 0)
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(-1, 10)


@pytest.mark.parametrize("step, n, expected", [
    (0, N, 0.85),
    (100, N, 0.85 + 0.25 * 0.12),  # 0.88: linear warmup of momentum over 400 steps
    (200, N, 0.91),
    (399, N, 0.85 + 399 / 400 * 0.12),
    (400, 5000, 0.97),  # plateau (warmdown of a 5000-step run starts at 1750)
    (1749, 5000, 0.97),
    (1750, 5000, 0.97),  # warmdown start: progress 0
    (1750 + 1625, 5000, 0.935),  # halfway through the 3250-step warmdown
    (5000, 5000, 0.90),  # end
    (400, N, 0.97 - (50 / 650) * 0.07),  # N=1000: warmdown started at 350, momentum warmup rule wins before 400
    (360, N, 0.85 + 0.9 * 0.12),
])
def test_muon_momentum(step, n, expected):
    assert muon_momentum(step, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step, expected", [
    (0, 0.28), (250, 0.28 * 0.5 * (1 + math.sqrt(0.5))), (500, 0.14), (750, 0.28 * 0.5 * (1 - math.sqrt(0.5))),
    (1000, 0.0),
])
def test_muon_weight_decay_cosine(step, expected):
    assert muon_weight_decay(step, N, 0.28) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_sft_and_rl_schedules():
    # chat_sft defaults: no warmup, warmdown over the last half to 0
    assert sft_lr_multiplier(0.0) == 1.0
    assert sft_lr_multiplier(0.5) == 1.0
    assert sft_lr_multiplier(0.75) == pytest.approx(0.5)
    assert sft_lr_multiplier(1.0) == pytest.approx(0.0)
    assert sft_lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5, rel=1e-6)
    assert sft_muon_momentum(0) == 0.85
    assert sft_muon_momentum(150) == pytest.approx(0.90)
    assert sft_muon_momentum(300) == pytest.approx(0.95) == sft_muon_momentum(10_000)
    assert rl_lr_multiplier(0, 200) == 1.0
    assert rl_lr_multiplier(50, 200) == 0.75
    with pytest.raises(ValueError):
        rl_lr_multiplier(0, 0)
