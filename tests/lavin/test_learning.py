"""Does the tiny LaVin-DiT learn? The genvis small-budget options, the reliance scores, and learning at a small budget.

Measured story (README "Why the tiny model learns"): the official tiny J-DiT cannot even learn to copy its query within
a CPU budget (its only path from query to target is joint attention, which does not learn to align positions in a few
hundred steps), and once it reads its query, it still ignores the context pairs. The slow tests here fail on the
official recipe and pass on the default one.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genvis.diffusion import RectifiedFlow, encode_episodes, sample_generators
from genvis.diffusion.rectified_flow import flow_matching_loss
from genvis.layers import patchify
from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.pipelines import LaVinDiTPipeline, evaluate_in_context, evaluate_reliance, psnr
from genvis.tasks import TaskMixture, list_tasks, sample_episode
from genvis.tasks.episodes import Episode
from genvis.training import load_config

TINY = {"in_channels": 12, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "attention_head_dim": 24}
GENVIS = {"query_skip": True, "context_summary": True, "prediction_type": "query_residual"}


def _pipeline(model) -> LaVinDiTPipeline:
    pipe = LaVinDiTPipeline(model.eval(), PixelUnshuffleAutoencoder(), FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# The options: zero-init, so they start as the official model; the residual head answers with the query untrained
# ---------------------------------------------------------------------------------------------------------------


def test_genvis_options_start_as_the_official_model():
    torch.manual_seed(0)
    official = LaVinDiTTransformer3DModel(**TINY)
    options = LaVinDiTTransformer3DModel(**TINY, query_skip=True, context_summary=True)
    missing, unexpected = options.load_state_dict(official.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} == {"query_embedder", "pair_encoder"}
    with torch.no_grad():  # give the shared weights non-trivial values: the zero-init extras must still add nothing
        for name, parameter in official.named_parameters():
            parameter.normal_(0, 0.2)
            options.get_parameter(name).copy_(parameter)
    x, c, t = torch.randn(2, 12, 1, 8, 8), torch.randn(2, 12, 5, 8, 8), torch.rand(2)
    torch.testing.assert_close(options(x, c, t).sample, official(x, c, t).sample)
    torch.testing.assert_close(  # packed, with one unconditional [zero frame, query] stream
        options([x[0], x[1]], [c[0], c[1, :, 3:]], t).sample[1],
        official([x[0], x[1]], [c[0], c[1, :, 3:]], t).sample[1],
    )


def test_task_vector_reads_the_pairs_and_is_zero_without_them():
    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel(**TINY, context_summary=True)
    torch.nn.init.normal_(model.pair_encoder[-1].weight)
    target = torch.randn(12, 1, 8, 8)
    one_pair, two_pairs = torch.randn(12, 3, 8, 8), torch.randn(12, 5, 8, 8)
    unconditional = torch.cat([torch.zeros(12, 1, 8, 8), target], dim=1)
    vectors = model._task_vector([one_pair, two_pairs, unconditional], [target, target, target])
    assert vectors.shape == (3, model.inner_dim)
    assert vectors[0].abs().sum() > 0 and vectors[1].abs().sum() > 0 and not (vectors[0] == vectors[1]).all()
    assert (vectors[2] == 0).all()
    changed = two_pairs.clone()
    changed[:, 4] += 1.0  # the query frame is not part of the task vector
    torch.testing.assert_close(model._task_vector([changed], [target])[0], vectors[1])


def test_untrained_query_residual_model_answers_with_the_query():
    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel(**TINY, prediction_type="query_residual")
    episode = sample_episode("denoising", 1, seed=3, size=16, split="test")
    frames = _pipeline(model)(episode.context_pairs, episode.query, output_type="pt", guidance_scale=1.0).frames
    torch.testing.assert_close(frames.transpose(0, 1) * 2 - 1, episode.query, atol=2e-5, rtol=0)


def test_query_skip_kernel_sees_the_neighbouring_query_patches_and_packs_like_padded():
    torch.manual_seed(0)
    wide = LaVinDiTTransformer3DModel(**TINY, query_skip=True, query_skip_kernel=3)
    assert wide.query_embedder.weight.shape == (wide.inner_dim, 12 * 4 * 9) and not wide.query_embedder.weight.any()
    official = LaVinDiTTransformer3DModel(**TINY)
    wide.load_state_dict(official.state_dict(), strict=False)
    x, c, t = torch.randn(2, 12, 1, 8, 8), torch.randn(2, 12, 3, 8, 8), torch.rand(2)
    torch.testing.assert_close(wide(x, c, t).sample, official(x, c, t).sample)  # zero-init: the official model
    torch.nn.init.normal_(wide.query_embedder.weight, std=0.5)
    patches = lambda latents: wide._target_tokens(  # noqa: E731 - target tokens of one (12, 1, 8, 8) query
        torch.zeros(16, 48), patchify(latents[None], (1, 2, 2))[0][0], [(1, 4, 4)]
    )
    query = torch.randn(12, 1, 8, 8)
    moved = query.clone()
    moved[:, :, 0:2, 0:2] += 1.0  # query patch (0, 0): tokens (0,0), (0,1), (1,0), (1,1) see it, (2, 2) does not
    changed = (patches(moved) - patches(query)).abs().sum(-1).view(4, 4) > 0
    assert changed[:2, :2].all() and not changed[2:, :].any() and not changed[:, 2:].any()
    packed = wide([x[0], x[1]], [c[0], c[1]], t).sample
    torch.testing.assert_close(torch.stack(packed), wide(x, c, t).sample)
    with pytest.raises(ValueError, match="query_skip_kernel must be an odd positive int"):
        LaVinDiTTransformer3DModel(**TINY, query_skip=True, query_skip_kernel=2)


def test_copy_normalization_weighs_each_sample_by_its_copy_error():
    torch.manual_seed(0)
    target = torch.randn(3, 12, 1, 4, 4)
    query = target.clone()
    query[0] += 0.5  # copy error 0.25
    query[1] += 0.2  # 0.04
    query[2] += 0.01  # 1e-4, below the floor 0.01
    context = torch.cat([torch.randn(3, 12, 2, 4, 4), query], dim=2)
    model = lambda noisy, ctx, t: type("Out", (), {"sample": torch.zeros_like(noisy)})()  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    plain = RectifiedFlow(context_dropout=0.0).training_loss(model, target, context, generator=generator)
    generator = torch.Generator().manual_seed(1)
    normed = RectifiedFlow(context_dropout=0.0, loss_normalization="copy").training_loss(
        model, target, context, generator=generator
    )
    weights = 1 / torch.tensor([0.25, 0.04, 0.01])
    torch.testing.assert_close(normed.per_sample, plain.per_sample * weights / weights.mean())
    with pytest.raises(ValueError, match="loss_normalization must be one of"):
        RectifiedFlow(loss_normalization="task")


def test_prediction_type_is_validated():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        LaVinDiTTransformer3DModel(**TINY, prediction_type="epsilon")


def test_sample_loss_weighting_scores_the_implied_clean_latents():
    torch.manual_seed(0)
    data, noise, prediction = torch.randn(3, 12, 1, 4, 4), torch.randn(3, 12, 1, 4, 4), torch.randn(3, 12, 1, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    noisy = t.view(-1, 1, 1, 1, 1) * data + (1 - t.view(-1, 1, 1, 1, 1)) * noise
    implied = noisy + (1 - t.view(-1, 1, 1, 1, 1)) * prediction  # x_hat of the predicted velocity
    expected = (implied - data).square().mean((1, 2, 3, 4)) + 0.1 * (implied - data).abs().mean((1, 2, 3, 4))
    weighted = flow_matching_loss(prediction, data - noise, 0.1, error_scale=1 - t)
    torch.testing.assert_close(weighted, expected)
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        RectifiedFlow(loss_weighting="snr")


# ---------------------------------------------------------------------------------------------------------------
# Reliance scores
# ---------------------------------------------------------------------------------------------------------------


class _FakePipeline:
    """Answers with a function of (context pairs, query) as a ``(T, 3, H, W)`` tensor in [0, 1]."""

    def __init__(self, answer):
        self.answer = answer

    def __call__(self, context_pairs, query, generator=None, output_type="pt", **kwargs):
        class Out:
            pass

        out = Out()
        out.frames = ((self.answer(context_pairs, query) + 1) / 2).transpose(0, 1)
        return out


def _episodes():
    return [
        sample_episode(t, 1, seed=s, size=16, split="test") for t in ("edge_detection", "blurring") for s in (1, 2)
    ]


def test_reliance_of_an_oracle_a_context_blind_and_a_query_blind_answerer():
    episodes = _episodes()
    task_of_pairs = {id(e.context_pairs[0][0]): e.task for e in episodes}
    first_target = {e.task: e.query_target for e in reversed(episodes)}

    def own(query):
        return next(e for e in episodes if e.query is query)

    def oracle(pairs, query):  # the right answer for the task the pairs show, the query itself otherwise
        return own(query).query_target if task_of_pairs[id(pairs[0][0])] == own(query).task else own(query).query

    def context_blind(pairs, query):  # perfect, but the same answer whatever the pairs
        return own(query).query_target

    def query_blind(pairs, query):  # one answer per task shown, whatever the query
        return first_target[task_of_pairs[id(pairs[0][0])]]

    for answer, context, query in ((oracle, 1.0, 1.0), (context_blind, 0.0, 1.0), (query_blind, None, 0.5)):
        predictions = [answer(e.context_pairs, e.query) for e in episodes]
        scores = evaluate_reliance(_FakePipeline(answer), episodes, predictions)
        assert scores.query_rate == query, answer.__name__
        assert context is None or scores.context_rate == context, answer.__name__
        assert scores.context_total == scores.query_total == 4 and set(scores.per_task) == {
            "edge_detection",
            "blurring",
        }


def test_reliance_needs_two_tasks_with_two_episodes():
    episodes = _episodes()[:3]
    with pytest.raises(ValueError, match="needs >= 2 tasks with >= 2 episodes each"):
        evaluate_reliance(_FakePipeline(lambda p, q: q), episodes, [e.query for e in episodes])


# ---------------------------------------------------------------------------------------------------------------
# Config errors at start-up
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.kinds=[]"], "data.tasks / data.kinds: no task left"),
        (["data.tasks=[no_such_task]"], "no_such_task"),
        (["vae.pixel_factor=4", "data.size=36"], r"data.size: 36 px is not divisible by the VAE x patch grid"),
        (["data.num_pairs=[0,2]"], "data.num_pairs"),
        (["sampling.episodes_per_task=1"], r"sampling.episodes_per_task: the reliance scores need >= 2 \(0 = no"),
        (["sampling.num_inference_steps=10"], "sampling.time_grid and sampling.num_inference_steps"),
    ],
)
def test_configs_that_cannot_learn_fail_at_start_up(overrides, message, lavin_script):
    script = lavin_script
    cfg = load_config(script.TrainConfig, script.DEFAULT_CONFIG, overrides)
    with pytest.raises(ValueError, match=message):
        script.check_config(cfg, script.build_vae(cfg.vae))


# ---------------------------------------------------------------------------------------------------------------
# Learning at a small budget (slow): these fail on the official recipe
# ---------------------------------------------------------------------------------------------------------------


def _identity(episode: Episode) -> Episode:
    return Episode("identity", [], episode.query, episode.query.clone(), episode.source_ids)


def _train(model, episode_fn, steps: int, lr: float, flow: RectifiedFlow, batch: int = 16) -> None:
    vae = PixelUnshuffleAutoencoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    for step in range(steps):
        latents = encode_episodes(vae, [episode_fn(step * batch + i) for i in range(batch)])
        ids = [step * batch + i for i in range(batch)]
        flow.training_loss(model, latents.targets, latents.contexts, generator=sample_generators(0, ids),
                           query_frames=latents.query_frames).loss.backward()  # fmt: skip
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDENTITY_PSNR = 20.0  # dB, held-out; measured: 25-33 dB with query_skip, 12-13 dB for the official tiny model


@pytest.mark.slow
def test_query_skip_learns_to_copy_its_query_where_the_official_tiny_model_cannot(one_thread):
    """The defect: the official tiny J-DiT's only query -> target path is attention, which does not align positions."""
    mixture = TaskMixture(tasks=["denoising"], num_pairs=0, size=32, seed=0)
    held_out = [_identity(sample_episode("denoising", 0, seed=10_000 + i, size=32, split="test")) for i in range(3)]
    scores = {}
    for name, options in (("official", {}), ("query_skip", {"query_skip": True})):
        torch.manual_seed(0)
        model = LaVinDiTTransformer3DModel(**TINY, **options)
        _train(model, lambda i: _identity(mixture[i]), steps=150, lr=3e-3, flow=RectifiedFlow())
        pipe = _pipeline(model)
        answers = [
            pipe([], e.query, output_type="pt", generator=torch.Generator().manual_seed(0)).frames for e in held_out
        ]
        scores[name] = sum(psnr(a.transpose(0, 1) * 2 - 1, e.query_target) for a, e in zip(answers, held_out)) / 3
    assert scores["query_skip"] > IDENTITY_PSNR > scores["official"] + 4, scores


CONTEXT_MARGIN, QUERY_MARGIN = 0.6, 0.85  # chance 0.5; the official recipe measured ~0.5 context


@pytest.mark.slow
def test_genvis_recipe_reads_its_context_and_its_query_at_a_small_budget(one_thread, lavin_script):
    """300 steps of the genvis recipe (tiny.yaml's model, loss, lr, pairs) on the 12 image tasks, held-out scores.

    Pinned to ``query_skip_kernel=1`` and ``loss_normalization="none"`` (the recipe before the 1500-step default
    added them): the copy-normalised loss trades early context reliance for restoration accuracy, measured 0.58 at
    300 steps and 0.56 at 450 steps (4 episodes per task) against 0.78-0.85 at the default's 1500, too close to
    chance (0.5) for a small-budget test. The official recipe scores ~0.5 here and fails it.
    """
    cfg = lavin_script.TrainConfig()
    cfg.model.query_skip_kernel, cfg.flow.loss_normalization = 1, "none"
    tasks = list_tasks("image")
    mixture = TaskMixture(tasks=tasks, num_pairs=tuple(cfg.data.num_pairs), size=cfg.data.size, seed=0)
    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel(
        **TINY, query_skip=cfg.model.query_skip, context_summary=cfg.model.context_summary,
        prediction_type=cfg.model.prediction_type, query_skip_kernel=cfg.model.query_skip_kernel,
    )  # fmt: skip
    flow = RectifiedFlow(context_dropout=cfg.flow.context_dropout, loss_weighting=cfg.flow.loss_weighting,
                         loss_normalization=cfg.flow.loss_normalization)  # fmt: skip
    _train(model, mixture.__getitem__, steps=300, lr=cfg.optim.lr, flow=flow)
    episodes = [sample_episode(t, 2, seed=10_000 + i, size=32, split="test") for t in tasks for i in range(3)]
    pipe = _pipeline(model)
    scores, predictions = evaluate_in_context(pipe, episodes, guidance_scale=1.5, return_predictions=True)
    reliance = evaluate_reliance(pipe, episodes, predictions, guidance_scale=1.5)
    assert reliance.query_rate >= QUERY_MARGIN, reliance
    assert reliance.context_rate >= CONTEXT_MARGIN, reliance
    # within 3 dB of copying the query on every PSNR task (the residual head starts at the copy)
    assert all(s.psnr > s.psnr_copy - 3 for s in scores.values() if s.iou is None), scores
