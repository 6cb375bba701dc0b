"""Rectified flow: conventions (t=1 data), logit-normal times, loss, context dropout, per-sample RNG, diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genvis.diffusion import (
    LAVIN_DIT_TIME_GRID_20,
    RectifiedFlow,
    drop_context,
    flow_matching_loss,
    interpolate,
    lavin_time_to_sigma,
    sample_generators,
    sample_logit_normal,
    shift_time,
    sigma_to_lavin_time,
)
from genvis.models import LaVinDiTTransformer3DModel


def test_interpolation_endpoints_and_velocity():
    data, noise = torch.randn(3, 4, 1, 2, 2), torch.randn(3, 4, 1, 2, 2)
    torch.testing.assert_close(interpolate(data, noise, torch.ones(3)), data)
    torch.testing.assert_close(interpolate(data, noise, torch.zeros(3)), noise)
    t = torch.tensor([0.2, 0.5, 0.9])
    # d x_t / d t == data - noise
    eps = 1e-3
    derivative = (interpolate(data, noise, t + eps) - interpolate(data, noise, t)) / eps
    torch.testing.assert_close(derivative, data - noise, rtol=1e-3, atol=1e-3)


def test_logit_normal_times():
    gen = torch.Generator().manual_seed(0)
    t = sample_logit_normal(20000, generator=gen)
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = sample_logit_normal(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() < t.mean() - 0.1  # shift > 1 moves mass towards noise
    torch.testing.assert_close(shift_time(torch.tensor([0.5]), 1.0), torch.tensor([0.5]))
    again = sample_logit_normal(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)


def test_loss_is_mse_plus_tenth_l1_per_sample():
    pred, target = torch.randn(2, 4, 1, 3, 3), torch.randn(2, 4, 1, 3, 3)
    loss = flow_matching_loss(pred, target)
    manual = ((pred - target) ** 2).flatten(1).mean(1) + 0.1 * (pred - target).abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, manual)
    mask = torch.zeros(2, 1, 1, 3, 3)
    mask[..., 0, :] = 1
    masked = flow_matching_loss(pred, target, mask=mask)
    manual_masked = flow_matching_loss(pred[..., :1, :], target[..., :1, :])
    torch.testing.assert_close(masked, manual_masked)
    with pytest.raises(ValueError, match="differ in shape"):
        flow_matching_loss(pred, target[:, :2])


def test_drop_context_keeps_query_after_a_zero_frame():
    context = torch.randn(2, 4, 5, 2, 2)
    out = drop_context(context, torch.tensor([True, False]))
    assert out[0].shape == (4, 2, 2, 2) and torch.count_nonzero(out[0][:, 0]) == 0
    torch.testing.assert_close(out[0][:, 1], context[0, :, -1])
    torch.testing.assert_close(out[1], context[1])
    with pytest.raises(ValueError, match="query_frames"):
        drop_context(context, torch.tensor([True, False]), query_frames=6)


def test_per_sample_generators_do_not_depend_on_the_split():
    flow = RectifiedFlow(context_dropout=0.5)
    full = flow.sample_timesteps(4, sample_generators(7, range(4)))
    halves = torch.cat([flow.sample_timesteps(2, sample_generators(7, ids)) for ids in ([0, 1], [2, 3])])
    assert torch.equal(full, halves)
    assert not torch.equal(full, flow.sample_timesteps(4, sample_generators(7, range(4), step=1)))
    assert len(set(full.tolist())) == 4  # not the same draw for every sample (the seed-42 gotcha)


def test_training_loss_with_and_without_context_dropout():
    model = LaVinDiTTransformer3DModel(num_layers=1, num_attention_heads=2, num_kv_heads=1, attention_head_dim=12,
                                       in_channels=4)  # fmt: skip
    target, context = torch.randn(3, 4, 1, 4, 4), torch.randn(3, 4, 5, 4, 4)
    seen = []

    def spy(hidden_states, encoder_hidden_states, timestep):
        seen.append([c.shape[1] for c in encoder_hidden_states])
        return model(hidden_states, encoder_hidden_states, timestep)

    out = RectifiedFlow(context_dropout=1.0).training_loss(spy, target, context, generator=torch.Generator())
    assert seen[-1] == [2, 2, 2]  # [zero frame, query]
    # zero-init model predicts 0, so the loss equals the loss of a zero prediction of the velocity
    torch.testing.assert_close(out.per_sample, flow_matching_loss(torch.zeros_like(out.target), out.target))
    RectifiedFlow(context_dropout=0.0).training_loss(spy, target, context, generator=torch.Generator())
    assert seen[-1] == [5, 5, 5]
    with pytest.raises(ValueError, match="context_dropout"):
        RectifiedFlow(context_dropout=1.5)


def test_diffusers_flow_match_scheduler_reproduces_lavin_euler():
    """sigma = 1 - t and a negated velocity make diffusers' Euler step equal the official forward-time Euler step."""
    grid = torch.tensor(LAVIN_DIT_TIME_GRID_20)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=[float(lavin_time_to_sigma(t)) for t in grid[:-1]])
    torch.testing.assert_close(scheduler.sigmas.float(), 1 - grid, rtol=0, atol=1e-6)

    data = torch.randn(1, 4, 1, 2, 2)
    noise = torch.randn(1, 4, 1, 2, 2)
    ours = theirs = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(sigma_to_lavin_time(timestep / scheduler.config.num_train_timesteps))
        assert abs(t - float(grid[i])) < 1e-5
        velocity = data - noise  # exact velocity of the straight path
        ours = ours + (grid[i + 1] - grid[i]) * velocity
        theirs = scheduler.step(-velocity, timestep, theirs).prev_sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, data, rtol=1e-4, atol=1e-4)
