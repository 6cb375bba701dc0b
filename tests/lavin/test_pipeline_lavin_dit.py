"""LaVinDiTPipeline: determinism, output types, input checks, CFG branches, save/load, video queries, ST-VAE."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genvis.diffusion import LAVIN_DIT_TIME_GRID_20
from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.pipelines import LaVinDiTPipeline


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.05)
    return model


@pytest.fixture
def pipe() -> LaVinDiTPipeline:
    torch.manual_seed(0)
    transformer = LaVinDiTTransformer3DModel(
        in_channels=12, num_layers=1, num_attention_heads=2, num_kv_heads=1, attention_head_dim=12
    )
    pipeline = LaVinDiTPipeline(
        _randomise(transformer), PixelUnshuffleAutoencoder(), FlowMatchEulerDiscreteScheduler()
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _image(seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil(seed: int, size: int = 20) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _run(pipe, **kwargs):
    defaults = {
        "context_pairs": [(_image(0), _image(1)), (_image(2), _image(3))],
        "query": _image(4),
        "num_inference_steps": 3,
        "generator": torch.Generator().manual_seed(0),
    }
    return pipe(**{**defaults, **kwargs})


def test_seeded_determinism_and_output_types(pipe):
    a = _run(pipe, output_type="pt").frames
    b = _run(pipe, output_type="pt").frames
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    c = _run(pipe, output_type="pt", generator=torch.Generator().manual_seed(1)).frames
    assert not torch.equal(a, c)
    np_frames = _run(pipe, output_type="np").frames
    assert np_frames.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(np_frames, a.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = _run(pipe, output_type="pil").frames
    assert len(pil) == 1 and pil[0].size == (16, 16)
    latents = _run(pipe, output_type="latent").frames
    assert latents.shape == (1, 12, 1, 8, 8)
    (tuple_out,) = _run(pipe, output_type="pt", return_dict=False)
    assert torch.equal(tuple_out, a)


def test_cfg_runs_a_zero_frame_unconditional_branch(pipe):
    calls = []
    forward = pipe.transformer.forward

    def spy(hidden_states, encoder_hidden_states, timestep, return_dict=True):
        calls.append(encoder_hidden_states.clone())
        return forward(hidden_states, encoder_hidden_states, timestep, return_dict=return_dict)

    pipe.transformer.forward = spy
    _run(pipe, guidance_scale=1.5)
    assert [c.shape[2] for c in calls[:2]] == [5, 2]  # [in1, tgt1, in2, tgt2, query] then [zero, query]
    assert torch.count_nonzero(calls[1][:, :, 0]) == 0
    torch.testing.assert_close(calls[1][:, :, 1], calls[0][:, :, -1])
    calls.clear()
    _run(pipe, guidance_scale=1.0)
    assert len(calls) == 3  # one forward per step without guidance


def test_pil_inputs_are_resized_and_video_queries_keep_their_frames(pipe):
    out = pipe([(_pil(0), _pil(1))], _pil(2), num_inference_steps=2, height=16, width=24, output_type="pil")
    assert out.frames[0].size == (24, 16)
    clip = [_pil(i, size=16) for i in range(3)]
    frames = pipe([(clip, clip)], clip, num_inference_steps=2, output_type="np").frames
    assert frames.shape == (3, 16, 16, 3)


def test_official_time_grid_as_sigmas(pipe):
    sigmas = [1 - t for t in LAVIN_DIT_TIME_GRID_20[:-1]]
    out = _run(pipe, sigmas=sigmas, num_inference_steps=None, output_type="pt").frames
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_pairs": "pairs"}, "context_pairs must be a list"),
        ({"context_pairs": [(_image(0),)]}, r"context_pairs\[0\] must be an \(input, target\) pair"),
        ({"query": torch.zeros(4, 16, 16)}, "query: tensors must be"),
        ({"query": "image.png"}, "query: expected a PIL image"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a number >= 0, got -1.0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive int, got 0"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"height": 15}, "height must be a positive multiple of 4, got 15"),
        ({"latents": torch.zeros(1, 12, 1, 4, 4)}, "latents must have shape"),
    ],
)
def test_check_inputs_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)


def test_save_load_round_trip(pipe, tmp_path):
    expected = _run(pipe, output_type="pt").frames
    pipe.save_pretrained(tmp_path)
    loaded = LaVinDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is PixelUnshuffleAutoencoder
    torch.testing.assert_close(_run(loaded, output_type="pt").frames, expected, rtol=0, atol=0)


def test_pixel_unshuffle_autoencoder_is_exact():
    vae = PixelUnshuffleAutoencoder(spatial_compression_ratio=4)
    clip = torch.rand(2, 3, 3, 16, 8) * 2 - 1
    latents = vae.encode(clip).latent_dist.sample(generator=torch.Generator())
    assert latents.shape == (2, 48, 3, 4, 2)
    assert torch.equal(vae.decode(latents).sample, clip)
    with pytest.raises(ValueError, match="latent_channels"):
        PixelUnshuffleAutoencoder(latent_channels=5)


def test_pipeline_with_the_st_vae():
    from genvis.vae import build_st_vae

    vae = build_st_vae("tiny").eval()
    transformer = _randomise(
        LaVinDiTTransformer3DModel(in_channels=16, num_layers=1, num_attention_heads=2, num_kv_heads=1,
                                   attention_head_dim=12)
    )  # fmt: skip
    pipe = LaVinDiTPipeline(transformer, vae, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = _run(pipe, context_pairs=[(_image(0, 32), _image(1, 32))], query=_image(2, 32), output_type="pt")
    assert out.frames.shape == (1, 3, 32, 32) and torch.isfinite(out.frames).all()
    with pytest.raises(ValueError, match="1 or 1 \\+ 4k frames"):
        _run(pipe, context_pairs=[], query=torch.zeros(3, 2, 32, 32), output_type="pt")


def _sigmas_used(pipe, **kwargs) -> list[float]:
    seen = []
    original = pipe.scheduler.set_timesteps

    def record(*args, **kw):
        original(*args, **kw)
        seen.extend(float(s) for s in pipe.scheduler.sigmas)

    pipe.scheduler.set_timesteps = record
    try:
        pipe(
            [(_image(0), _image(1))], _image(4), generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs
        )
    finally:
        pipe.scheduler.set_timesteps = original
    return seen


@pytest.mark.parametrize(("kwargs", "grid"), [({}, "lavin-20"), ({"time_grid": "lavin-30"}, "lavin-30"),
                                              ({"time_grid": "lavin-40"}, "lavin-40")])  # fmt: skip
def test_official_time_grids_by_name_and_the_20_point_default(pipe, kwargs, grid):
    from genvis.diffusion import LAVIN_DIT_TIME_GRIDS

    expected = [1 - t for t in LAVIN_DIT_TIME_GRIDS[grid]]  # the scheduler appends sigma 0 = t 1
    assert _sigmas_used(pipe, **kwargs) == pytest.approx(expected, abs=1e-6)
    assert len(expected) == int(grid.split("-")[1])


def test_uniform_steps_and_grid_errors(pipe):
    assert len(_sigmas_used(pipe, num_inference_steps=4)) == 5
    with pytest.raises(ValueError, match="time_grid must be one of"):
        _run(pipe, num_inference_steps=None, time_grid="lavin-25")
    with pytest.raises(ValueError, match="give at most one of num_inference_steps, time_grid and sigmas"):
        _run(pipe, time_grid="lavin-30")


def test_guidance_below_one_blends_towards_the_unconditional_answer(pipe):
    """Official CFG is v_u + w (v_c - v_u) for every w: w = 0 is the unconditional answer, 0.5 lies between."""
    answers = {w: _run(pipe, guidance_scale=w, output_type="latent").frames for w in (0.0, 0.5, 1.0)}
    unconditional = _run(pipe, context_pairs=[], guidance_scale=1.0, output_type="latent").frames  # [query] only
    assert not torch.allclose(answers[0.5], answers[1.0]) and not torch.allclose(answers[0.0], answers[1.0])
    assert not torch.allclose(answers[0.0], unconditional)  # [zero frame, query] is not [query]
    # with one Euler step the blend is exactly linear in w
    one = {
        w: _run(pipe, guidance_scale=w, num_inference_steps=1, output_type="latent").frames for w in (0.0, 0.5, 1.0)
    }
    torch.testing.assert_close(one[0.5], (one[0.0] + one[1.0]) / 2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers pipeline features: CPU offload, step callbacks, interruption


def _st_vae_pipe() -> LaVinDiTPipeline:
    from genvis.vae import build_st_vae

    torch.manual_seed(0)
    transformer = LaVinDiTTransformer3DModel(in_channels=16, num_layers=1, num_attention_heads=2, num_kv_heads=1,
                                             attention_head_dim=12)  # fmt: skip
    pipe = LaVinDiTPipeline(_randomise(transformer), build_st_vae("tiny").eval(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("vae", ["pixel", "st_vae"])
def test_model_cpu_offload_gives_the_same_answer(pipe, vae):
    """enable_model_cpu_offload (accelerate hooks; the CPU stands in for the accelerator) changes no output; the
    parameter-free pixel autoencoder stays out of the hook chain (it raised StopIteration there)."""
    pipe = pipe if vae == "pixel" else _st_vae_pipe()
    size = 16 if vae == "pixel" else 32
    kwargs = {"context_pairs": [(_image(0, size), _image(1, size))], "query": _image(2, size), "output_type": "pt"}
    expected = _run(pipe, **kwargs).frames
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._all_hooks and hasattr(pipe.transformer, "_hf_hook")
    assert hasattr(pipe.vae, "_hf_hook") == (vae == "st_vae")
    for _ in range(2):  # maybe_free_model_hooks re-arms the hooks after each call
        torch.testing.assert_close(_run(pipe, **kwargs).frames, expected, rtol=0, atol=1e-6)
    pipe.remove_all_hooks()


def test_sequential_cpu_offload_on_the_cpu_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match=r"enable_sequential_cpu_offload\(device='cpu'\).*accelerator"):
        pipe.enable_sequential_cpu_offload(device="cpu")


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        assert pipeline is pipe and pipeline.num_timesteps == 3 and pipeline.guidance_scale == 1.5
        seen.append((step, float(timestep), sorted(tensors), tensors["latents"].clone()))
        return tensors

    plain = _run(pipe, output_type="latent").frames
    same = _run(pipe, output_type="latent", callback_on_step_end=record,
                callback_on_step_end_tensor_inputs=["latents", "condition", "uncondition"]).frames  # fmt: skip
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == ["condition", "latents", "uncondition"]
    torch.testing.assert_close(seen[-1][3], plain, rtol=0, atol=0)  # latents after each step

    # a returned tensor replaces the pipeline's: zeroing the condition stream changes the answer
    def zero_condition(pipeline, step, timestep, tensors):
        return {"condition": torch.zeros_like(tensors["condition"])}

    changed = _run(pipe, output_type="latent", callback_on_step_end=zero_condition,
                   callback_on_step_end_tensor_inputs=["condition"]).frames  # fmt: skip
    assert not torch.allclose(changed, plain)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs: \['prompt_embeds'\] not among"):
        _run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(ValueError, match="callback_on_step_end returned"):
        _run(pipe, callback_on_step_end=lambda *args: {"noise": torch.zeros(1)})


def test_pipeline_callback_objects_and_interrupt(pipe):
    from diffusers.callbacks import PipelineCallback

    class StopAfter(PipelineCallback):
        tensor_inputs = ["latents"]  # noqa: RUF012 (diffusers' attribute)

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == self.config.cutoff_step_index:
                pipeline._interrupt = True
            return callback_kwargs

    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    seen = []
    out = _run(pipe, guidance_scale=1.0, output_type="latent", callback_on_step_end=StopAfter(cutoff_step_ratio=None, cutoff_step_index=0),
               ).frames  # fmt: skip
    assert len(calls) == 1 and pipe.interrupt  # steps 1 and 2 skipped
    full = _run(pipe, guidance_scale=1.0, output_type="latent",
                    callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"].clone()) or k).frames  # fmt: skip
    torch.testing.assert_close(out, seen[0], rtol=0, atol=0)  # the latents after step 0 are the answer
    assert not pipe.interrupt and not torch.allclose(out, full)  # the next call starts afresh and runs every step


@pytest.mark.parametrize("vae", ["pixel", "st_vae"])
def test_generator_lists_and_num_images_per_prompt(pipe, vae):
    """A list of generators gives one sample each; sample i equals the one-sample call with generator i."""
    pipe = pipe if vae == "pixel" else _st_vae_pipe()
    size = 16 if vae == "pixel" else 32
    kwargs = {"context_pairs": [(_image(0, size), _image(1, size))], "query": _image(2, size), "output_type": "pt"}
    singles = [_run(pipe, generator=torch.Generator().manual_seed(s), **kwargs).frames for s in (3, 4)]
    batch = _run(pipe, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], num_images_per_prompt=2,
                 **kwargs).frames  # fmt: skip
    assert batch.shape == (2, *singles[0].shape)
    for i in range(2):
        torch.testing.assert_close(batch[i], singles[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    # one generator: one draw of noise for both samples (different answers), a list of one = the generator itself
    shared = _run(pipe, num_images_per_prompt=2, **kwargs).frames
    assert shared.shape == batch.shape and not torch.allclose(shared[0], shared[1])
    torch.testing.assert_close(_run(pipe, generator=[torch.Generator().manual_seed(0)], **kwargs).frames,
                               _run(pipe, **kwargs).frames, rtol=0, atol=0)  # fmt: skip
    pil = _run(pipe, num_images_per_prompt=2, **{**kwargs, "output_type": "pil"}).frames
    assert len(pil) == 2 and len(pil[0]) == 1 and isinstance(pil[0][0], PIL.Image.Image)
    with pytest.raises(ValueError, match="generator: a list needs one generator per sample, got 1 for"):
        _run(pipe, generator=[torch.Generator()], num_images_per_prompt=2)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive int, got 0"):
        _run(pipe, num_images_per_prompt=0)
