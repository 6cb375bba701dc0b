"""DDPM hybrid loss and the text-to-video objectives: conventions checked against diffusers' schedulers and oracles."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from genvis.diffusion.ddpm import DDPMObjective, discretized_gaussian_log_likelihood, make_ddpm_scheduler, normal_kl
from genvis.diffusion.text_to_video import TextToVideoObjective


def test_scheduler_is_the_papers():
    config = make_ddpm_scheduler().config
    assert (config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end) == (
        1000,
        "linear",
        1e-4,
        0.02,
    )
    assert config.variance_type == "learned_range" and config.prediction_type == "epsilon"


def test_add_noise_matches_diffusers():
    objective = DDPMObjective()
    data, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    steps = torch.tensor([0, 500, 999])
    expected = objective.scheduler.add_noise(data, noise, steps)
    torch.testing.assert_close(objective.add_noise(data, noise, steps), expected, rtol=1e-5, atol=1e-5)


def test_learned_range_matches_the_scheduler_sampling_variance():
    objective = DDPMObjective()
    scheduler = objective.scheduler
    for step in (1, 10, 500, 999):
        values = torch.linspace(-1, 1, 5).reshape(1, 5)
        ours = objective.model_log_variance(values, torch.tensor([step]))
        theirs = scheduler._get_variance(step, predicted_variance=values)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_normal_kl_matches_torch_distributions():
    mean1, mean2, logvar1, logvar2 = torch.randn(4, 10).unbind(0)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
        torch.distributions.Normal(mean2, (0.5 * logvar2).exp()),
    )
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected, rtol=1e-5, atol=1e-6)


def test_discretized_likelihood_is_a_distribution_over_the_bins():
    centres = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.0, -2.0), (0.7, -4.0), (-0.95, 0.5)):
        probs = discretized_gaussian_log_likelihood(centres, torch.tensor(mean), torch.tensor(log_scale)).exp()
        assert abs(float(probs.sum()) - 1.0) < 1e-3


def test_vb_trains_only_the_variance_and_mse_only_the_noise():
    objective = DDPMObjective()
    data, noise = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    steps = torch.tensor([0, 300])
    noisy = objective.add_noise(data, noise, steps)
    output = torch.randn(2, 8, 2, 4, 4, requires_grad=True)
    result = objective.loss(output, data, noisy, noise, steps)
    (grad_vb,) = torch.autograd.grad(result.vb.sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(result.mse.sum(), output)
    assert not grad_vb[:, :4].any() and grad_vb[:, 4:].abs().sum() > 0
    assert not grad_mse[:, 4:].any() and grad_mse[:, :4].abs().sum() > 0
    torch.testing.assert_close(result.per_sample, result.mse + result.vb)


def test_oracle_has_zero_loss_for_t_above_zero():
    objective = DDPMObjective()
    data, noise = torch.randn(3, 4, 2, 4, 4).clamp(-1, 1), torch.randn(3, 4, 2, 4, 4)
    steps = torch.tensor([1, 200, 999])
    noisy = objective.add_noise(data, noise, steps)
    # eps = noise and v = -1 (posterior variance): the model's Gaussian is the true posterior
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    result = objective.loss(output, data, noisy, noise, steps)
    assert result.mse.abs().max() < 1e-6 and result.vb.abs().max() < 1e-3
    # a wrong variance costs VLB bits
    assert (objective.loss(output.clone().fill_(1.0), data, noisy, noise, steps).vb > result.vb).all()


def test_fixed_variance_objective_is_plain_mse():
    objective = DDPMObjective(make_ddpm_scheduler(learned_variance=False))
    data, noise = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 1, 4, 4)
    output = torch.randn(2, 4, 1, 4, 4)
    steps = torch.tensor([3, 4])
    result = objective.loss(output, data, objective.add_noise(data, noise, steps), noise, steps)
    torch.testing.assert_close(result.per_sample, (output - noise).square().mean((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="model_output: expected shape"):
        objective.loss(torch.randn(2, 8, 1, 4, 4), data, data, noise, steps)


def test_objective_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMObjective(DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="objective"):
        TextToVideoObjective("edm")
    with pytest.raises(ValueError, match="caption_dropout"):
        TextToVideoObjective(caption_dropout=1.5)


class _Oracle(torch.nn.Module):
    """Knows the clean data, so it predicts the exact target of either objective."""

    def __init__(self, data: torch.Tensor, kind: str, objective: TextToVideoObjective) -> None:
        super().__init__()
        self.data, self.kind, self.objective = data, kind, objective
        self.config = SimpleNamespace(in_channels=data.shape[1])
        self.out_channels = data.shape[1] * (2 if objective.learned_variance else 1)
        self.calls: list[torch.Tensor] = []

    def forward(self, noisy, text, timestep, mask, drop_text):
        self.calls.append(drop_text)
        if self.kind == "flow":
            sigma = (timestep / 1000.0).reshape(-1, 1, 1, 1, 1)
            return SimpleNamespace(sample=(noisy - self.data) / sigma)  # noise - data
        ddpm = self.objective.ddpm
        noise = (noisy - ddpm._gather("sqrt_alphas_cumprod", timestep, noisy) * self.data) / ddpm._gather(
            "sqrt_one_minus_alphas_cumprod", timestep, noisy
        )
        return SimpleNamespace(sample=torch.cat([noise, -torch.ones_like(noise)], dim=1))


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_training_loss_conventions_with_an_oracle(kind):
    objective = TextToVideoObjective(kind, caption_dropout=1.0)
    data = torch.rand(4, 4, 3, 4, 4) * 2 - 1
    oracle = _Oracle(data, kind, objective)
    objective.check_model(oracle)
    result = objective.training_loss(oracle, data, torch.randn(4, 5, 8), generator=torch.Generator().manual_seed(3))
    positive = result.timesteps > 0
    assert result.per_sample[positive].max() < 1e-3
    assert result.drop_text.all() and oracle.calls[0].all()
    unconditional = TextToVideoObjective(kind, caption_dropout=0.0).training_loss(oracle, data, torch.randn(4, 5, 8))
    assert not unconditional.drop_text.any()


def test_flow_scheduler_integrates_the_training_velocity():
    objective = TextToVideoObjective("flow")
    scheduler = objective.make_scheduler()
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    data, noise = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    scheduler.set_timesteps(1)
    # one Euler step from pure noise with the exact velocity lands on the data
    out = scheduler.step(noise - data, scheduler.timesteps[0], noise).prev_sample
    torch.testing.assert_close(out, data, rtol=1e-5, atol=1e-5)


def test_check_model_rejects_mismatched_output_channels():
    fake = SimpleNamespace(config=SimpleNamespace(in_channels=4), out_channels=8)
    TextToVideoObjective("ddpm").check_model(fake)
    with pytest.raises(ValueError, match="needs 4 output channels"):
        TextToVideoObjective("flow").check_model(fake)
