import math

import pytest

import flowpp
from flowpp.schedules import learning_rate, warmed_up


def test_constant_schedule_warms_up_linearly_then_holds():
    cfg = flowpp.get_config("cifar10")
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 1000) == pytest.approx(1.5e-4)
    assert learning_rate(cfg, 2000) == learning_rate(cfg, 500_000) == pytest.approx(3e-4)


def test_imagenet32_schedule():
    cfg = flowpp.get_config("imagenet32")
    assert learning_rate(cfg, 2500) == pytest.approx(5e-4)
    assert learning_rate(cfg, 50_000) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60_000) == pytest.approx(1e-3 * 0.99995**10_000)
    assert learning_rate(cfg, 10**6) == pytest.approx(3e-4)


def test_imagenet64_schedule_is_defined_everywhere_and_never_negative():
    cfg = flowpp.get_config("imagenet64")
    # the official code returns None exactly at these boundaries and a negative rate in (280k, 290k)
    for step in (10_000, 50_000, 55_000, 230_000, 240_000, 280_000, 285_000, 290_000):
        lr = learning_rate(cfg, step)
        assert lr is not None and lr >= 0, step
    assert learning_rate(cfg, 5_000) == pytest.approx(2e-4)
    assert learning_rate(cfg, 30_000) == pytest.approx(4e-4)
    assert learning_rate(cfg, 100_000) == pytest.approx(3e-4)
    assert learning_rate(cfg, 235_000) == pytest.approx(5e-6)
    assert learning_rate(cfg, 260_000) == pytest.approx(1e-5)
    assert learning_rate(cfg, 285_000) == pytest.approx(5e-7)
    assert learning_rate(cfg, 400_000) == pytest.approx(1e-6)


def test_cosine_schedule_knows_the_budget():
    cfg = flowpp.get_config("mnist").replace(lr_schedule="cosine")
    peak = cfg.lr
    # a short budget: warm-up ends at 5% of it even though warmup_steps is not reached
    assert learning_rate(cfg, 10, progress=0.05) == pytest.approx(
        peak * (1 + __import__("math").cos(0.05 * 3.14159265)) / 2, rel=1e-4
    )
    assert learning_rate(cfg, 1, progress=0.01) < 0.25 * peak
    assert learning_rate(cfg, 5000, progress=0.5) == pytest.approx(cfg.min_lr + (peak - cfg.min_lr) / 2)
    assert learning_rate(cfg, 9999, progress=1.0) == pytest.approx(cfg.min_lr)
    values = [learning_rate(cfg, int(p * 2000), progress=p) for p in [i / 100 for i in range(5, 101)]]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically after warm-up


def test_linear_schedule_warms_up_like_cosine_then_falls_on_a_straight_line_to_min_lr():
    cfg = flowpp.get_config("mnist").replace(lr_schedule="linear", min_lr=1e-4)
    cosine = cfg.replace(lr_schedule="cosine")
    for step, p in ((1, 0.01), (50, 0.02), (10, 0.04)):  # the same warm-up, by steps or by budget
        linear_part = 1e-4 + (cfg.lr - 1e-4) * (1 - p)
        cosine_part = 1e-4 + (cfg.lr - 1e-4) * 0.5 * (1 + math.cos(math.pi * p))
        expected = learning_rate(cosine, step, progress=p) * linear_part / cosine_part
        assert learning_rate(cfg, step, progress=p) == pytest.approx(expected)
    assert learning_rate(cfg, 500, progress=0.5) == pytest.approx((cfg.lr + 1e-4) / 2)
    assert learning_rate(cfg, 900, progress=0.75) == pytest.approx(1e-4 + 0.25 * (cfg.lr - 1e-4))
    assert learning_rate(cfg, 2000, progress=1.0) == pytest.approx(1e-4)
    assert warmed_up(cfg, 10, progress=0.05) and not warmed_up(cfg, 10, progress=0.04)
    # below the cosine in the first half, above it in the second
    assert learning_rate(cfg, 500, progress=0.25) < learning_rate(cosine, 500, progress=0.25)
    assert learning_rate(cfg, 1500, progress=0.75) > learning_rate(cosine, 1500, progress=0.75)


def test_imagenet64_5bit_schedule_is_the_repaired_release_schedule():
    cfg = flowpp.get_config("imagenet64-5bit")
    for step in (10_000, 50_000, 110_000, 130_000):  # the release's boundaries: defined, never negative
        assert learning_rate(cfg, step) >= 0
    assert learning_rate(cfg, 5_000) == pytest.approx(2e-4)
    assert learning_rate(cfg, 50_000) == pytest.approx(4e-4)
    assert learning_rate(cfg, 52_000) == pytest.approx(4e-4 * 0.99995**2_000)
    assert learning_rate(cfg, 100_000) == pytest.approx(3e-4)
    assert learning_rate(cfg, 120_000) == pytest.approx(5e-6)
    assert learning_rate(cfg, 130_000) == learning_rate(cfg, 10**6) == pytest.approx(1e-5)


def test_celeba_schedules():
    c64 = flowpp.get_config("celeba64-5bit")
    assert learning_rate(c64, 10_000) == pytest.approx(2e-5)
    assert learning_rate(c64, 20_000) == learning_rate(c64, 50_000) == pytest.approx(4e-5)
    assert learning_rate(c64, 51_000) == pytest.approx(4e-5 * 0.9995**1_000)
    assert learning_rate(c64, 60_000) == pytest.approx(1e-5)  # 0.9995^10k would be far below: floored
    c128 = flowpp.get_config("celeba128-5bit")
    assert learning_rate(c128, 25_000) == pytest.approx(5e-6)
    assert learning_rate(c128, 50_000) == learning_rate(c128, 10**6) == pytest.approx(1e-5)


def test_warmed_up_after_the_warm_up_steps_or_the_budget_aware_schedules_first_5_percent():
    cfg = flowpp.get_config("mnist")  # linear (budget-aware, as cosine), 100 warm-up steps
    assert not warmed_up(cfg, 99) and warmed_up(cfg, 100)
    assert not warmed_up(cfg, 10, progress=0.049) and warmed_up(cfg, 10, progress=0.05)
    official = flowpp.get_config("cifar10")  # 2,000 warm-up steps; progress plays no part
    assert not warmed_up(official, 1_999, progress=0.9) and warmed_up(official, 2_000)
    assert warmed_up(official.replace(warmup_steps=0), 0)
