"""Pieces of the training loop, tested on their own."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import flowpp
from flowpp.checkpoint import CheckpointError
from flowpp.data.batches import Prefetch, batch_iterator
from flowpp.distributed import DistInfo, agree
from flowpp.runs import METRIC_FIELDS, CheckpointKeeper, MetricsWriter, RunDir
from flowpp.schedules import budget_used, learning_rate_now
from flowpp.training import (
    EMA,
    DivergenceGuard,
    TrainSettings,
    TrainState,
    backward_and_clip,
    health_problem,
    make_optimizer,
    train_step,
)


def _grad_norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


@pytest.mark.parametrize("units", ["nats", "bpd"])
def test_clipping_acts_on_the_configured_scale(units):
    # A gradient whose bits/dim-scale norm is 0.5 has a nats-scale norm of 0.5 D ln 2 (66.5 for
    # the 192 dimensions of `tiny`): the official (nats) recipe clips it, the bpd one does not.
    cfg = flowpp.get_config("tiny").replace(grad_clip=1.0, grad_clip_units=units)
    nats_per_bpd = cfg.num_dims * math.log(2.0)
    w = torch.nn.Parameter(torch.tensor([0.3, -0.4], dtype=torch.float64))
    loss_bpd = (w * torch.tensor([0.6, 0.8], dtype=torch.float64)).sum() * 0.5  # d loss / dw has norm 0.5
    norm = backward_and_clip(loss_bpd, [w], cfg)
    assert norm.item() == pytest.approx(0.5 * nats_per_bpd)  # logged on the nats scale either way
    if units == "nats":
        assert _grad_norm([w]) == pytest.approx(1.0)  # clipped to unit norm, in nats units
        assert w.grad.tolist() == pytest.approx([0.6, 0.8])
    else:
        assert _grad_norm([w]) == pytest.approx(0.5)  # below 1 on the bpd scale: untouched
        assert w.grad.tolist() == pytest.approx([0.3, 0.4])


def test_nats_units_give_adam_the_official_gradient(tiny_model):
    # Unclipped (a huge threshold), the gradient is that of the mean negative log-likelihood in nats.
    cfg = tiny_model.config.replace(grad_clip=1e30, grad_clip_units="nats")
    x = torch.randint(0, 256, (4, *cfg.image_shape), generator=torch.Generator().manual_seed(0))
    noise = tiny_model.dequantizer.sample_noise(x.shape, torch.Generator().manual_seed(1)).double()
    tiny_model.eval()
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    nll = -tiny_model.log_prob(x, noise=noise).mean()
    expected = torch.autograd.grad(nll, params, retain_graph=True)
    bpd = nll / (cfg.num_dims * math.log(2.0))
    backward_and_clip(bpd, params, cfg)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


# --- the other pieces ---------------------------------------------------------------------------


def test_train_state_round_trips_and_reads_older_checkpoints():
    state = TrainState(step=7, images_seen=56, epoch=1, offset=8, rewarm_from=3, best_valid_bpd=2.5)
    assert TrainState.from_dict(state.to_dict()) == state
    older = {k: v for k, v in state.to_dict().items() if k != "last_valid_bpd"} | {"removed_field": 1}
    assert TrainState.from_dict(older).step == 7
    state.record_valid(3.0)
    state.record_valid(2.0)
    state.record_valid(2.2)
    assert state.best_valid_bpd == 2.0 and state.last_valid_bpd == 2.2


def test_settings_defaults_are_defined_once():
    assert TrainSettings.default("eval_images") == TrainSettings(out_dir="x").eval_images == 1000
    assert TrainSettings.default("extra") == {}


def test_budget_is_the_first_limit_to_run_out():
    state = TrainState(step=50, train_seconds=30.0)
    assert budget_used(TrainSettings("x", max_steps=100), state) == 0.5
    assert budget_used(TrainSettings("x", max_minutes=1.0), state) == 0.5
    assert budget_used(TrainSettings("x", max_steps=200, max_minutes=0.75), state) == pytest.approx(2 / 3)


def test_learning_rate_warms_up_again_after_a_rollback():
    cfg = flowpp.get_config("tiny")  # constant schedule, warm-up 10 steps to 1e-3
    assert learning_rate_now(cfg, TrainState(step=50), None) == pytest.approx(1e-3)
    assert learning_rate_now(cfg, TrainState(step=50, rewarm_from=50), None) == pytest.approx(1e-4)
    assert learning_rate_now(cfg, TrainState(step=54, rewarm_from=50), None) == pytest.approx(5e-4)
    assert learning_rate_now(cfg, TrainState(step=80, rewarm_from=50), None) == pytest.approx(1e-3)


def test_ema_averages_parameters_and_copies_buffers(tiny_model):
    ema = EMA(tiny_model, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    before = [p.clone() for p in ema.model.parameters()]
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)
    ema.update(moved, step=100)
    for b, e, m in zip(before, ema.model.parameters(), moved.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
    warm = EMA(tiny_model, decay=0.999, warmup=True)
    warm.update(moved, step=0)  # decay min(0.999, 1/10): mostly the new weights
    p0, m0 = next(warm.model.parameters()), next(moved.parameters())
    torch.testing.assert_close(p0, 0.1 * next(tiny_model.parameters()) + 0.9 * m0)


def test_the_optimizer_takes_the_steps_of_plain_adam_with_the_configs_settings(tiny_model):
    config = tiny_model.config.replace(adam_betas=(0.8, 0.95), adam_eps=1e-6)
    reference = copy.deepcopy(tiny_model)
    start = [p.detach().clone() for p in tiny_model.parameters()]
    opt = make_optimizer(list(tiny_model.parameters()), config)
    plain = torch.optim.Adam(reference.parameters(), lr=config.lr, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    try:  # where this PyTorch has a fused kernel for these tensors, it is the one used
        torch.optim.Adam([torch.zeros(1, dtype=torch.float64, requires_grad=True)], fused=True)
        assert opt.defaults["fused"] is True
    except (RuntimeError, ValueError):
        assert opt.defaults["foreach"] is True
    g = torch.Generator().manual_seed(0)
    for lr in (1e-2, 3e-3, 5e-4):  # the schedule changes the rate between steps
        for o in (opt, plain):
            o.param_groups[0]["lr"] = lr
        for p, q in zip(tiny_model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for (name, p), q, p0 in zip(tiny_model.named_parameters(), reference.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
        assert (p - p0).abs().max() > 1e-3, name  # Adam's steps are about lr in size: it moved


def test_train_step_computes_clipped_gradients_without_stepping(tiny_model):
    opt = torch.optim.Adam(tiny_model.parameters(), lr=0.1)
    before = [p.clone() for p in tiny_model.parameters()]
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    noise = tiny_model.dequantizer.sample_noise(x.shape, torch.Generator().manual_seed(1)).double()
    loss, norm, finite = train_step(tiny_model, tiny_model, opt, x, noise, lr=0.01)
    assert bool(finite) and opt.param_groups[0]["lr"] == 0.01
    assert loss.item() == pytest.approx(tiny_model.bits_per_dim(x, noise=noise).mean().item(), rel=1e-6)
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert _grad_norm(trainable) <= tiny_model.config.grad_clip * tiny_model.config.nats_per_bpd * (1 + 1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))  # the optimizer has not stepped
    _, _, finite = train_step(
        tiny_model, tiny_model, opt, x, noise, lr=0.01, hook=lambda step, loss: loss * float("nan")
    )
    assert not bool(finite)


def test_agree_in_one_process_is_the_local_verdict():
    assert agree(torch.tensor(True), torch.tensor(2.5), False, DistInfo(), (0.5, 7.0)) == (True, 2.5, False, (0.5, 7.0))
    assert agree(torch.tensor(False), torch.tensor(float("nan")), True, DistInfo())[:3:2] == (False, True)


def test_batches_cover_each_epoch_once_and_resume_mid_epoch():
    it = batch_iterator(10, 3, seed=0, epoch=0, offset=0)
    first = [next(it) for _ in range(4)]  # 3 batches fill an epoch of 10 (tail dropped), then epoch 1
    seen = torch.cat([idx for _, _, idx in first[:3]])
    assert len(set(seen.tolist())) == 9 and first[3][0] == 1
    resumed = batch_iterator(10, 3, seed=0, epoch=0, offset=first[0][1])
    assert torch.equal(next(resumed)[2], first[1][2])
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(batch_iterator(2, 3, 0, 0, 0))


def _keeper(tmp_path, model, log=None):
    run = RunDir(tmp_path / "run")
    run.create(resume=False)
    return CheckpointKeeper(run, model.config, {"seed": 0}, keep=2, dist=DistInfo(), log=log or (lambda m: None))


def _save(keeper, model, ema, opt, state):
    return keeper.save(model, ema.model, opt, state.to_dict())


def test_checkpoint_keeper_saves_resumes_and_rolls_back(tmp_path, tiny_model):
    keeper = _keeper(tmp_path, tiny_model)
    ema = EMA(tiny_model, 0.99)
    opt = torch.optim.Adam(tiny_model.parameters())
    saved = copy.deepcopy(tiny_model.state_dict())
    for step in (1, 2, 3):
        assert _save(keeper, tiny_model, ema, opt, TrainState(step=step)).name == f"checkpoint-{step:08d}.pt"
    assert sorted(p.name for p in keeper.run.checkpoints.glob("*.pt")) == [
        "checkpoint-00000002.pt",
        "checkpoint-00000003.pt",
    ]
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    assert keeper.rollback(tiny_model, ema.model, opt)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    path, state, config = keeper.resume(tiny_model, ema.model, opt)
    assert path.name == "checkpoint-00000003.pt" and state["step"] == 3 and config == tiny_model.config
    other = CheckpointKeeper(keeper.run, tiny_model.config.replace(components=5), {}, 2, DistInfo(), print)
    with pytest.raises(CheckpointError, match="another config.*components"):
        other.resume(tiny_model, ema.model, opt)


def _guard(model, msgs, state=None):
    state = state or TrainState(step=1)
    return DivergenceGuard(state, TrainSettings("x", max_steps=1), model.config, msgs.append), state


def test_the_guard_refuses_to_checkpoint_non_finite_weights(tmp_path, tiny_model):
    msgs = []
    keeper = _keeper(tmp_path, tiny_model, msgs.append)
    guard, _ = _guard(tiny_model, msgs)
    ema = EMA(tiny_model, 0.99)
    with torch.no_grad():
        next(tiny_model.parameters()).fill_(float("nan"))
    assert not guard.may_checkpoint(tiny_model, ema)
    assert not list(keeper.run.checkpoints.glob("*.pt")) and "non-finite" in msgs[0]
    assert not keeper.rollback(tiny_model, ema.model, torch.optim.Adam(tiny_model.parameters()))


def test_the_guard_refuses_to_checkpoint_exploding_weights(tmp_path, tiny_model):
    msgs = []
    guard, state = _guard(tiny_model, msgs)
    ema = EMA(tiny_model, 0.99)
    assert guard.may_checkpoint(tiny_model, ema)
    norm = state.checkpoint_param_norm
    assert norm > 0
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(9.0)  # grown, but within PARAM_NORM_GROWTH
    state.step = 2
    assert guard.may_checkpoint(tiny_model, ema)
    assert state.checkpoint_param_norm == pytest.approx(9 * norm)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(11.0)  # finite, but an explosion since the last checkpoint
    state.step = 3
    assert not guard.may_checkpoint(tiny_model, ema)
    assert "norm grew" in msgs[-1] and state.checkpoint_param_norm == pytest.approx(9 * norm)


def test_the_guard_refuses_to_save_weights_whose_own_loss_is_unhealthy(tiny_model):
    # A step is judged by its loss, computed before its update: the weights an update breaks are
    # judged by their own loss on that step's batch before they are saved.
    msgs = []
    state = TrainState(step=41, recent_losses=[2.0] * 16, healthy_streak=16)
    guard, _ = _guard(tiny_model, msgs, state)
    ema = EMA(tiny_model, 0.99)
    assert not guard.may_checkpoint(tiny_model, ema, loss_now=lambda: (True, 2.1e8))
    assert "step 41: not writing a checkpoint: the updated weights are unhealthy (loss 2.1e+08" in msgs[-1]
    assert state.checkpoint_param_norm is None  # a refused checkpoint is no reference
    assert "updated weights are unhealthy" in guard.save_problem(tiny_model, ema, lambda: (False, float("nan")))
    assert guard.save_problem(tiny_model, ema, lambda: (True, 2.1)) is None
    assert guard.may_checkpoint(tiny_model, ema, loss_now=lambda: (True, 2.1)) and state.checkpoint_param_norm > 0
    state.healthy_streak = 0  # best.pt follows the same rules as a checkpoint
    assert guard.save_problem(tiny_model, ema, lambda: (True, 2.1)) == "the last step was unhealthy"


def test_an_evaluation_of_unhealthy_weights_is_never_the_best():
    state = TrainState(step=10)
    assert not state.record_valid(1063.0, healthy=False)
    assert state.best_valid_bpd is None and state.best_step is None
    assert state.last_valid_bpd == 1063.0 and state.evals_since_best == 1
    state.step = 20
    assert state.record_valid(7.5) and (state.best_valid_bpd, state.best_step) == (7.5, 20)
    assert not state.record_valid(7.0, healthy=False) and state.best_valid_bpd == 7.5


def test_the_loss_of_the_updated_weights_changes_nothing_of_the_run(tiny_model):
    # Judged before a checkpoint of a healthy run, it must leave that run bit for bit as it was.
    from flowpp.training import OptimizerStep

    opt = make_optimizer(list(tiny_model.parameters()), tiny_model.config)
    step = OptimizerStep(tiny_model, tiny_model, opt, EMA(tiny_model, 0.99), seed=0, rank=0, share=1.0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    noise = tiny_model.dequantizer.sample_noise(x.shape, torch.Generator().manual_seed(1)).double()
    weights, rng = copy.deepcopy(tiny_model.state_dict()), torch.get_rng_state()
    tiny_model.train()
    loss, finite = step.loss_now(x, noise)
    assert bool(finite) and tiny_model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.state_dict().items())
    with torch.no_grad():
        expected = tiny_model.eval().bits_per_dim(x, noise=noise).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_a_stop_message_names_only_a_best_model_that_exists(tmp_path, tiny_model):
    msgs = []
    guard, state = _guard(tiny_model, msgs, TrainState(step=22))
    run = RunDir(tmp_path / "run")
    message = guard.stop_message(run, {"best_checkpoint": None, "best_valid_bpd": None})
    assert "before its first checkpoint" in message and "no best model" in message and "its best" not in message
    keeper = _keeper(tmp_path, tiny_model)
    ema, opt = EMA(tiny_model, 0.99), torch.optim.Adam(tiny_model.parameters())
    _save(keeper, tiny_model, ema, opt, TrainState(step=20))
    message = guard.stop_message(keeper.run, {"best_checkpoint": None, "best_valid_bpd": None})
    assert "its newest checkpoint is" in message and "no best model" in message
    message = guard.stop_message(keeper.run, {"best_checkpoint": "run/best.pt", "best_valid_bpd": 7.25})
    assert "its best model run/best.pt (valid 7.2500 bits/dim)" in message


def test_the_guard_skips_then_rolls_back_then_stops(tmp_path, tiny_model):
    msgs = []
    state = TrainState(step=1, recent_losses=[2.0] * 16, healthy_streak=16)
    guard = DivergenceGuard(state, TrainSettings("x", max_steps=1, max_bad_steps=2, max_rollbacks=1),
                            tiny_model.config, msgs.append)  # fmt: skip
    assert guard.judge(True, 2.1) == "apply"
    guard.healthy(2.1)
    assert guard.judge(False, float("nan")) == "skip" and state.skipped_steps == 1 and state.healthy_streak == 0
    assert guard.judge(True, 9.0) == "roll back" and state.rollbacks_in_row == 1
    keeper = _keeper(tmp_path, tiny_model, msgs.append)
    ema, opt = EMA(tiny_model, 0.99), torch.optim.Adam(tiny_model.parameters())
    guard.roll_back(keeper, tiny_model, ema, opt)  # nothing to go back to yet: skips on
    assert "no checkpoint to roll back to yet" in msgs[-1] and state.rollbacks == 0
    _save(keeper, tiny_model, ema, opt, TrainState(step=1, recent_losses=[2.0, 2.5]))
    assert guard.judge(False, float("nan")) == "skip"
    assert guard.judge(False, float("nan")) == "stop" and "still unhealthy" in msgs[-1]


def test_the_guard_rolls_back_with_the_checkpoints_history_and_halves_the_rate_when_it_repeats(tmp_path, tiny_model):
    msgs = []
    state = TrainState(step=5)
    guard = DivergenceGuard(state, TrainSettings("x", max_steps=1), tiny_model.config, msgs.append)
    keeper = _keeper(tmp_path, tiny_model, msgs.append)
    ema, opt = EMA(tiny_model, 0.99), torch.optim.Adam(tiny_model.parameters())
    _save(keeper, tiny_model, ema, opt, TrainState(step=3, recent_losses=[2.0, 2.5]))
    state.rollbacks_in_row = 1
    guard.roll_back(keeper, tiny_model, ema, opt)
    assert (state.rollback_step, state.recent_losses, state.rollbacks, state.rewarm_from) == (3, [2.0, 2.5], 1, 5)
    assert state.lr_scale == 1.0 and "re-warming the learning rate" in msgs[-1]
    state.rollbacks_in_row = 2
    guard.roll_back(keeper, tiny_model, ema, opt)
    assert state.lr_scale == 0.5 and "now scaled by 0.5" in msgs[-1]
    message = guard.stop_message(keeper.run, {})
    assert "its last good checkpoint is" in message and "checkpoint-00000003.pt" in message


def test_checkpoint_keeper_rolls_back_to_a_chosen_checkpoint_and_keeps_it(tmp_path, tiny_model):
    keeper = _keeper(tmp_path, tiny_model)
    ema, opt = EMA(tiny_model, 0.99), torch.optim.Adam(tiny_model.parameters())
    first = copy.deepcopy(tiny_model.state_dict())
    _save(keeper, tiny_model, ema, opt, TrainState(step=1, recent_losses=[3.0, 2.9]))
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    _save(keeper, tiny_model, ema, opt, TrainState(step=2, recent_losses=[3.0, 2.9, 1.0]))
    path, step, history = keeper.rollback(tiny_model, ema.model, opt, step=1)
    assert path.name == "checkpoint-00000001.pt" and step == 1 and history == [3.0, 2.9]
    assert all(torch.equal(v, first[k]) for k, v in tiny_model.state_dict().items())
    # While a rollback series is open, its checkpoint survives any number of newer ones.
    for s in (3, 4, 5):
        _save(keeper, tiny_model, ema, opt, TrainState(step=s, rollback_step=1))
    assert sorted(p.name for p in keeper.run.checkpoints.glob("*.pt")) == [
        "checkpoint-00000001.pt",
        "checkpoint-00000004.pt",
        "checkpoint-00000005.pt",
    ]
    keeper.run.checkpoint_file(1).unlink()  # gone (deleted by hand): the newest one is taken
    assert keeper.rollback(tiny_model, ema.model, opt, step=1)[1] == 5


def test_a_resume_with_a_new_learning_rate_forgets_the_rollback_scale(tmp_path, tiny_model):
    msgs = []
    keeper = _keeper(tmp_path, tiny_model, msgs.append)
    ema, opt = EMA(tiny_model, 0.99), torch.optim.Adam(tiny_model.parameters())
    _save(keeper, tiny_model, ema, opt, TrainState(step=7, lr_scale=0.25, rollbacks_in_row=2, rollback_step=3))
    _, saved, config = keeper.resume(tiny_model, ema.model, opt)
    same = TrainState.resumed(saved, new_lr=config.lr != tiny_model.config.lr, log=msgs.append)
    assert (same.lr_scale, same.rollbacks_in_row, same.rollback_step) == (0.25, 2, 3)
    lower = CheckpointKeeper(keeper.run, tiny_model.config.replace(lr=1e-4), {}, 2, DistInfo(), msgs.append)
    _, saved, config = lower.resume(tiny_model, ema.model, opt)
    state = TrainState.resumed(saved, new_lr=config.lr != 1e-4, log=msgs.append)
    assert (state.lr_scale, state.rollbacks_in_row, state.rollback_step) == (1.0, 0, None)
    assert "reset to 1" in msgs[-1]


def test_health_judges_non_finite_steps_and_loss_spikes():
    state = TrainState()
    assert health_problem(False, 3.0, state, 1.25) == "non-finite loss or gradient"
    assert health_problem(True, 1e9, state, 1.25) is None  # a fresh run: nothing to compare with yet
    state.last_valid_bpd = 2.0
    assert "1.25 x the last validation bpd 2" in health_problem(True, 2.6, state, 1.25)
    for v in [2.0] * 15 + [9.0]:  # one outlier does not move the median
        state.remember_healthy(v)
    assert health_problem(True, 2.4, state, 1.25) is None
    assert "over 1.25 x the recent median 2" in health_problem(True, 2.6, state, 1.25)
    assert health_problem(True, 2.6, state, None) is None  # off
    for _ in range(100):
        state.remember_healthy(1.0)
    assert len(state.recent_losses) == 64 and state.healthy_streak == 116
    assert health_problem(True, 1.3, state, 1.25) is not None


def test_metrics_writer_keeps_the_columns_and_drops_rows_after_a_resumed_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    writer = MetricsWriter(run, enabled=True)
    for step in (1, 2, 3):
        writer.write(dict(step=step, train_bpd=1.0 / step))
    with open(run.metrics_file, "a") as f:
        f.write("4,32,0.5")  # a row cut short by a crash
    MetricsWriter(run, enabled=True, resume_step=2)
    lines = run.metrics_file.read_text().splitlines()
    assert lines[0].split(",") == METRIC_FIELDS and [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    MetricsWriter(RunDir(tmp_path / "other"), enabled=False).write(dict(step=1))
    assert not (tmp_path / "other" / "metrics.csv").exists()
    assert np.isfinite(float(lines[2].split(",")[2]))


def test_the_metrics_window_counts_finite_steps_and_images():
    state = TrainState()
    state.add_step(2.0, 8, 0.5)
    state.add_step(None, 8, 0.5)  # a skipped step: its images and time count, its loss does not
    state.add_step(4.0, 8, 1.0)
    assert TrainState.from_dict(state.to_dict()).close_window() == (3.0, 12.0)  # survives a checkpoint
    assert state.close_window() == (3.0, 12.0)
    mean, _ = state.close_window()
    assert mean != mean  # nan: nothing since the last row


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetch_keeps_the_order_and_hands_errors_over(depth):
    def items():
        yield from range(5)
        raise OSError("disk gone")

    ahead = Prefetch(items(), depth)
    assert [next(ahead) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="disk gone"):
        next(ahead)
    ahead.close()
    endless = Prefetch(iter(int, 1), depth)  # an endless source: close() must stop the thread
    next(endless)
    endless.close()
    assert depth == 0 or not endless.thread.is_alive()


def test_metrics_of_a_run_written_before_a_column_was_added_survive_a_resume(tmp_path):
    run = RunDir(tmp_path)
    old = [k for k in METRIC_FIELDS if k != "threads"]
    run.metrics_file.write_text(
        ",".join(old) + "\n" + "\n".join(f"{s}," + ",".join("1" * (len(old) - 1)) for s in (1, 2, 3))
    )
    MetricsWriter(run, enabled=True, resume_step=2).close()
    lines = run.metrics_file.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_FIELDS) and [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert lines[1].endswith(",")  # the new column is empty for the old rows


def test_events_say_what_is_due_after_a_step():
    from flowpp.training.events import Due, Events

    cfg = flowpp.get_config("tiny").replace(warmup_steps=3)
    settings = TrainSettings("x", max_steps=10, log_every=2, eval_every=4, checkpoint_every=6, patience=2)
    state = TrainState()
    events = Events(settings, cfg, state, fresh=True)
    due = {}
    for step in range(1, 10):
        state.step = step
        d = events.due(now=float(step), progress=step / 10)
        due[step] = (d.log, d.evaluate, d.checkpoint)
        if d.checkpoint:
            events.checkpoint_considered(attempted=True, now=float(step))
    assert [s for s, d in due.items() if d[0]] == [2, 4, 6, 8]
    assert [s for s, d in due.items() if d[1]] == [4, 8]
    assert [s for s, d in due.items() if d[2]] == [3, 6]  # the first at the end of the warm-up, then every 6
    state.step = 10  # the last step: a metrics row, but no timed evaluation or checkpoint (the end has its own)
    assert events.due(now=10.0, progress=1.0) == Due(log=True, evaluate=False, checkpoint=False)
    resumed = Events(settings, cfg, TrainState(step=3), fresh=False)  # a resumed run has had its first checkpoint
    assert not resumed.due(now=3.0, progress=0.3).checkpoint
    state.evals_since_best = 1
    assert not events.out_of_patience()
    state.evals_since_best = 2
    assert events.out_of_patience()


def test_events_follow_the_minutes_of_the_clock_they_are_given():
    from flowpp.training import Events

    settings = TrainSettings("x", max_minutes=10, eval_minutes=1.0, checkpoint_minutes=None)
    state = TrainState(step=5, wall_seconds=100.0)  # resumed at 100 s of the run
    events = Events(settings, flowpp.get_config("tiny"), state, fresh=False)
    assert not events.due(now=130.0, progress=0.2).evaluate
    assert events.due(now=161.0, progress=0.3).evaluate
    events.evaluated(now=161.0)
    assert not events.due(now=200.0, progress=0.35).evaluate
