"""Rectified-flow training for LaVin-DiT (the SiT "transport" conventions of the official code).

Conventions (spec /work/shared/specs/lavin_dit_mvdit.md §1.6-1.7; the code, not the paper's Alg. 2):
- time ``t`` in [0, 1], **t = 0 is noise, t = 1 is data**: ``x_t = t * x + (1 - t) * eps``;
- the model predicts the velocity ``u = x - eps`` (integrate forward from t = 0 to t = 1);
- ``t = sigmoid(n)``, ``n ~ N(mean, std)`` (logit-normal), optionally shifted ``t <- t / (t + s (1 - t))``;
- loss per sample ``MSE(v, u) + 0.1 * L1(v, u)`` over the target latents only (the condition stream carries no loss),
  then averaged over the batch;
- context dropout for classifier-free guidance: with probability ``p`` a sample's condition stream becomes
  ``[zero frame, query]`` (what the official unconditional branch feeds at inference).

Randomness never comes from a global or a fixed-seed generator (the official transport seeds 42 on every rank, so
DDP ranks draw identical noise): callers pass a generator, or one generator per sample (see
:func:`sample_generators`) so that the draws of a sample do not depend on how the batch is split across processes.

diffusers' ``FlowMatchEulerDiscreteScheduler`` uses ``x = sigma * noise + (1 - sigma) * data`` and a velocity
``noise - data``: :func:`lavin_time_to_sigma` / :func:`sigma_to_lavin_time` convert the time and the velocity is
negated. Tests: tests/lavin/test_rectified_flow.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_TIME_GRID",
    "LAVIN_DIT_TIME_GRIDS",
    "LAVIN_DIT_TIME_GRID_20",
    "LAVIN_DIT_TIME_GRID_30",
    "LAVIN_DIT_TIME_GRID_40",
    "RectifiedFlow",
    "RectifiedFlowLoss",
    "drop_context",
    "flow_matching_loss",
    "interpolate",
    "lavin_time_grid_sigmas",
    "lavin_time_to_sigma",
    "sample_generators",
    "sample_logit_normal",
    "shift_time",
    "sigma_to_lavin_time",
]

# The official Euler time grids (``lib/transport/integrators.py``, spec §1.7): half the points uniform on the noisy
# end [0, 0.05], the rest with linearly growing steps up to 1. Only 20, 30 and 40 points exist.
LAVIN_DIT_TIME_GRID_20: tuple[float, ...] = (
    0.0, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.0500,
    0.0524, 0.0730, 0.1148, 0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.8100, 1.0,
)  # fmt: skip
LAVIN_DIT_TIME_GRID_30: tuple[float, ...] = (
    0.0, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.0250, 0.0286, 0.0321, 0.0357, 0.0393, 0.0429, 0.0464,
    0.0500, 0.0511, 0.0600, 0.0779, 0.1049, 0.1410, 0.1862, 0.2403, 0.3036, 0.3759, 0.4573, 0.5477, 0.6472, 0.7557,
    0.8733, 1.0,
)  # fmt: skip
LAVIN_DIT_TIME_GRID_40: tuple[float, ...] = (
    0.0, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237, 0.0263, 0.0289, 0.0316, 0.0342,
    0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.0500, 0.0506, 0.0555, 0.0655, 0.0804, 0.1004, 0.1253, 0.1553, 0.1902,
    0.2302, 0.2752, 0.3251, 0.3801, 0.4401, 0.5051, 0.5750, 0.6500, 0.7300, 0.8150, 0.9050, 1.0,
)  # fmt: skip
LAVIN_DIT_TIME_GRIDS: dict[str, tuple[float, ...]] = {
    "lavin-20": LAVIN_DIT_TIME_GRID_20,
    "lavin-30": LAVIN_DIT_TIME_GRID_30,
    "lavin-40": LAVIN_DIT_TIME_GRID_40,
}
DEFAULT_TIME_GRID = "lavin-20"  # the official inference default (``--timesteps 20``)


def lavin_time_grid_sigmas(name: str) -> list[float]:
    """diffusers sigmas (1 = noise) of a named official grid, without the final 0 (the scheduler appends it).

    ``lavin-20`` gives 19 Euler steps, ``lavin-30`` 29 and ``lavin-40`` 39, as the official sampler.
    """
    if name not in LAVIN_DIT_TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {sorted(LAVIN_DIT_TIME_GRIDS)}, got {name!r}")
    return [1.0 - t for t in LAVIN_DIT_TIME_GRIDS[name][:-1]]


LOSS_WEIGHTINGS = ("velocity", "sample")
# "copy": each sample's loss over its copy-the-query error (floored), weights of batch mean 1
LOSS_NORMALIZATIONS = ("none", "copy")
COPY_ERROR_FLOOR = 0.01

Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_generators(seed: int, sample_ids: Sequence[int] | torch.Tensor, step: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from ``(seed, step, sample id)``.

    A sample's noise and time then depend only on its global index, not on the rank or the per-rank batch size, which
    makes a 2-process run reproduce a 1-process run with the same global batch.
    """
    ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else list(sample_ids)
    # large odd multipliers keep (seed, step, id) triples from colliding for any realistic run length
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + int(i)) for i in ids]


def _randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws of ``shape``; a list of generators draws row ``i`` from generator ``i`` (on CPU)."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t / (t + shift * (1 - t))``: ``shift > 1`` moves mass towards noise (t -> 0); ``shift = 1`` is the identity."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return t / (t + shift * (1 - t))


def sample_logit_normal(
    batch_size: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: Generators = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flow times ``sigmoid(N(mean, std))``, shifted by ``shift``; shape ``(batch_size,)`` fp32."""
    normal = _randn((batch_size,), generator, torch.device(device), torch.float32)
    return shift_time(torch.sigmoid(mean + std * normal), shift)


def _expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)  # (B,) -> (B, 1, 1, ...)


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = t * data + (1 - t) * noise`` with per-sample ``t`` of shape ``(B,)``."""
    t = _expand_time(t, data)
    return t * data + (1 - t) * noise


def flow_matching_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = 0.1,
    mask: torch.Tensor | None = None,
    error_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample ``mean((v - u)^2) + l1_weight * mean(|v - u|)`` over all non-batch axes, shape ``(B,)``.

    Args:
        prediction: predicted velocity ``(B, ...)``.
        target: velocity target ``data - noise`` of the same shape.
        l1_weight: weight of the L1 term (0.1 in the official loss).
        mask: optional ``(B, ...)`` weights broadcastable to ``prediction`` (1 = counted), e.g. to skip padded frames.
        error_scale: optional ``(B,)`` factor on each sample's error before squaring, e.g. ``1 - t`` turns the
            velocity error into the error of the implied clean sample (``RectifiedFlow(loss_weighting="sample")``).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    error = prediction.float() - target.float()
    if error_scale is not None:
        error = error * _expand_time(error_scale.float(), error)
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.square().mean(dims) + l1_weight * error.abs().mean(dims)
    mask = mask.float().expand_as(error)
    count = mask.sum(dims).clamp_min(1.0)
    return ((error.square() + l1_weight * error.abs()) * mask).sum(dims) / count


def drop_context(
    context: torch.Tensor | Sequence[torch.Tensor],
    drop: torch.Tensor,
    query_frames: int | Sequence[int] = 1,
) -> list[torch.Tensor]:
    """Replace the in-context pairs of the samples flagged in ``drop`` with one all-zero latent frame.

    Args:
        context: condition latents ``(B, C, T_c, H, W)`` or a list of ``(C, T_c_i, H, W)``; the query occupies the
            last ``query_frames`` frames.
        drop: ``(B,)`` bool, True where the sample becomes unconditional.
        query_frames: latent frames of the query (per sample or one for all).

    Returns:
        A list of per-sample condition latents (lengths differ once a sample is dropped; the model packs them).
    """
    samples = list(context)
    if drop.shape != (len(samples),):
        raise ValueError(f"drop must have shape ({len(samples)},), got {tuple(drop.shape)}")
    frames = [query_frames] * len(samples) if isinstance(query_frames, int) else list(query_frames)
    out = []
    for sample, dropped, n_query in zip(samples, drop.tolist(), frames):
        if not 1 <= n_query <= sample.shape[1]:
            raise ValueError(f"query_frames must be in [1, {sample.shape[1]}], got {n_query}")
        if dropped:
            sample = torch.cat([torch.zeros_like(sample[:, :1]), sample[:, -n_query:]], dim=1)
        out.append(sample)
    return out


def lavin_time_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """LaVin flow time (1 = data) -> diffusers sigma (1 = noise)."""
    return 1 - t


def sigma_to_lavin_time(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """diffusers sigma (1 = noise) -> LaVin flow time (1 = data)."""
    return 1 - sigma


@dataclass
class RectifiedFlowLoss:
    """What :meth:`RectifiedFlow.training_loss` returns.

    Args:
        loss: scalar batch mean of ``per_sample``.
        per_sample: ``(B,)`` losses.
        timesteps: ``(B,)`` flow times used.
        prediction: the model's velocity ``(B, C, T_x, H, W)``.
        target: the velocity target ``data - noise``.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    timesteps: torch.Tensor
    prediction: torch.Tensor | list[torch.Tensor]
    target: torch.Tensor | list[torch.Tensor]


class RectifiedFlow:
    """Rectified-flow objective for the J-DiT: time sampling, noising, context dropout and the velocity loss.

    Args:
        logit_mean: mean of the logit-normal time distribution.
        logit_std: std of the logit-normal time distribution.
        shift: time shift ``s`` (1 = none, the official default).
        l1_weight: weight of the L1 term added to the MSE (0.1 in the official code).
        context_dropout: probability of replacing a sample's context pairs with a zero frame (for CFG).
        loss_weighting: ``"velocity"`` (official: the loss on the velocity) or ``"sample"`` (each sample's error times
            ``1 - t``: the loss on the implied clean latents, which keeps x-prediction heads from being dominated by
            the ``1 / (1 - t)`` blow-up near t = 1).
        loss_normalization: ``"none"`` (official) or ``"copy"`` (genvis: each sample's loss divided by its
            copy-the-query error ``mean((x - query)^2)``, floored at :data:`COPY_ERROR_FLOOR`, with weights of batch
            mean 1 over the global batch (all-reduced under torch.distributed, so N ranks train as one process), so
            near-identity tasks, whose answers differ little from the query, weigh as much as the others).
    """

    def __init__(
        self,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        l1_weight: float = 0.1,
        context_dropout: float = 0.1,
        loss_weighting: str = "velocity",
        loss_normalization: str = "none",
    ) -> None:
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if not 0.0 <= context_dropout <= 1.0:
            raise ValueError(f"context_dropout must be in [0, 1], got {context_dropout}")
        if l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {l1_weight}")
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        self.l1_weight, self.context_dropout = l1_weight, context_dropout
        self.loss_weighting, self.loss_normalization = loss_weighting, loss_normalization

    def _sample_weights(self, targets, contexts, query_frames) -> torch.Tensor | None:
        """``(B,)`` weights of ``loss_normalization="copy"`` (None otherwise; 1 where the query's shape differs)."""
        if self.loss_normalization == "none":
            return None
        frames = [query_frames] * len(targets) if isinstance(query_frames, int) else list(query_frames)
        errors = []
        for target, context, count in zip(targets, contexts, frames):
            query = context[:, -count:]
            same = query.shape == target.shape
            errors.append(((target - query) ** 2).mean().float() if same else torch.tensor(float("nan")))
        errors = torch.stack(errors).to(targets[0].device)
        weights = 1.0 / errors.clamp_min(COPY_ERROR_FLOOR)
        weights = torch.where(errors.isnan(), torch.ones_like(weights), weights).detach()
        # batch mean 1 over the GLOBAL batch, so N data-parallel ranks train exactly like one process (a collective:
        # under torch.distributed every rank must call training_loss, as every DDP training step does)
        total = torch.stack(
            [weights.double().sum(), torch.tensor(float(len(weights)), device=weights.device).double()]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return weights / (total[0] / total[1]).to(weights.dtype)

    def _result(self, per_sample, weights, timesteps, prediction, velocity) -> RectifiedFlowLoss:
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.dtype)
        return RectifiedFlowLoss(per_sample.mean(), per_sample, timesteps, prediction, velocity)

    def _error_scale(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        # x_hat - x = (1 - t) (v_hat - v): "sample" weighting scores the implied clean sample
        return (1 - timesteps) if self.loss_weighting == "sample" else None

    def sample_timesteps(self, batch_size: int, generator: Generators = None, device="cpu") -> torch.Tensor:
        return sample_logit_normal(
            batch_size, mean=self.logit_mean, std=self.logit_std, shift=self.shift, generator=generator, device=device
        )

    def training_loss(
        self,
        model: Callable[..., object],
        target_latents: torch.Tensor | Sequence[torch.Tensor],
        context_latents: torch.Tensor | Sequence[torch.Tensor],
        *,
        generator: Generators = None,
        query_frames: int | Sequence[int] = 1,
        loss_mask: torch.Tensor | None = None,
    ) -> RectifiedFlowLoss:
        """One training loss evaluation.

        Args:
            model: a :class:`~genvis.models.LaVinDiTTransformer3DModel` (or a wrapper with the same call signature).
            target_latents: clean target latents ``(B, C, T_x, H, W)``, or a list of ``(C, T_x_i, H_i, W_i)``
                samples of different shapes (run packed).
            context_latents: clean condition latents ``(B, C, T_c, H, W)`` (pairs then query), or a list.
            generator: one generator, or one per sample (:func:`sample_generators`), for t, noise and dropout (drawn
                in that order per sample).
            query_frames: latent frames of the query at the end of the condition stream (per sample or one value).
            loss_mask: optional weights broadcastable to ``target_latents`` (padded input only).

        Returns:
            :class:`RectifiedFlowLoss`; ``prediction`` / ``target`` are lists when the input was.
        """
        packed = isinstance(target_latents, (list, tuple))
        if packed != isinstance(context_latents, (list, tuple)):
            raise ValueError("target_latents and context_latents must both be tensors or both be lists")
        if not packed and (target_latents.ndim != 5 or context_latents.ndim != 5):
            raise ValueError(
                f"latents must be (B, C, T, H, W), got target {tuple(target_latents.shape)} and context "
                f"{tuple(context_latents.shape)}"
            )
        if packed and loss_mask is not None:
            raise ValueError("loss_mask is only supported for padded (tensor) latents")
        targets = list(target_latents)
        batch, device = len(targets), targets[0].device
        weights = self._sample_weights(targets, list(context_latents), query_frames)
        timesteps = self.sample_timesteps(batch, generator, device)
        if packed and not (generator is None or isinstance(generator, torch.Generator)):
            noise = [_randn((1, *x.shape), [g], device, x.dtype)[0] for x, g in zip(targets, generator)]
        elif packed:
            noise = [_randn(tuple(x.shape), generator, device, x.dtype) for x in targets]
        else:
            noise = _randn(tuple(target_latents.shape), generator, device, target_latents.dtype)
        drop = _uniform(batch, generator, device) < self.context_dropout

        if not packed and not bool(drop.any()):
            noisy = interpolate(target_latents, noise, timesteps)
            velocity = target_latents - noise
            prediction = model(noisy, context_latents, timesteps).sample
            per_sample = flow_matching_loss(
                prediction, velocity, self.l1_weight, loss_mask, self._error_scale(timesteps)
            )
            return self._result(per_sample, weights, timesteps, prediction, velocity)

        # per-sample lengths differ (variable shapes or dropped context): run the model on packed samples
        noisy = [interpolate(x[None], n[None], t[None])[0] for x, n, t in zip(targets, noise, timesteps)]
        velocity = [x - n for x, n in zip(targets, noise)]
        contexts = drop_context(context_latents, drop, query_frames)
        prediction = model(noisy, contexts, timesteps).sample
        scales = self._error_scale(timesteps)
        if scales is None:
            scales = torch.ones_like(timesteps)
        if packed:
            per_sample = torch.cat(
                [
                    flow_matching_loss(p[None], u[None], self.l1_weight, error_scale=scale)
                    for p, u, scale in zip(prediction, velocity, (scales[i : i + 1] for i in range(batch)))
                ]
            )
            return self._result(per_sample, weights, timesteps, list(prediction), velocity)
        prediction, velocity = torch.stack(prediction), torch.stack(velocity)
        per_sample = flow_matching_loss(prediction, velocity, self.l1_weight, loss_mask, self._error_scale(timesteps))
        return self._result(per_sample, weights, timesteps, prediction, velocity)


def _uniform(batch_size: int, generator: Generators, device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand((batch_size,), generator=generator, device=gen_device).to(device)
    return torch.cat([torch.rand((1,), generator=g, device=g.device) for g in generator]).to(device)
