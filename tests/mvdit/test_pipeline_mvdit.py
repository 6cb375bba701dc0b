"""MVDiTPipeline: determinism, output types, CFG / null caption, input checks, save/load, both VAEs, export."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from genvis.data.video import read_frames
from genvis.diffusion.text_to_video import TextToVideoObjective
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
from genvis.pipelines.pipeline_mvdit import (
    MVDiTPipeline,
    build_image_vae,
    classifier_free_guidance,
    decode_video_latents,
    encode_video_latents,
    export_video,
)
from genvis.text import load_text_encoder, text_embed_dim
from genvis.vae.autoencoder_st_vae import build_st_vae

PROMPTS = ["a red circle moves left to right", "a green square moves top to bottom"]


def make_pipeline(vae=None, objective: str = "ddpm") -> MVDiTPipeline:
    torch.manual_seed(0)
    tokenizer, encoder = load_text_encoder("tiny-t5")
    vae = vae if vae is not None else build_image_vae("tiny")
    transformer = MVDiTTransformer3DModel(
        **{
            **MVDIT_PRESETS["tiny"],
            "in_channels": vae.config.latent_channels,
            "text_embed_dim": text_embed_dim(encoder),
            "max_text_length": 24,
            "learn_sigma": objective == "ddpm",
        }
    )
    with torch.no_grad():  # open the zero-initialised branches so the text actually matters
        for param in transformer.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    pipe = MVDiTPipeline(tokenizer, encoder, transformer, vae, TextToVideoObjective(objective).make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> MVDiTPipeline:
    return make_pipeline()


def run(pipe, **kwargs):
    defaults = {
        "prompt": PROMPTS,
        "num_frames": 3,
        "height": 16,
        "width": 16,
        "num_inference_steps": 3,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(0),
    }
    return pipe(**{**defaults, **kwargs}).frames


def test_seeded_determinism_and_prompt_dependence(pipe):
    first, second = run(pipe), run(pipe)
    assert torch.equal(first, second)
    assert first.shape == (2, 4, 3, 2, 2)
    other = run(pipe, prompt=["a purple triangle", "a white circle over a black background"])
    assert not torch.allclose(first, other)


def test_output_types(pipe):
    pil = run(pipe, output_type="pil")
    assert len(pil) == 2 and len(pil[0]) == 3 and isinstance(pil[0][0], PIL.Image.Image) and pil[0][0].size == (16, 16)
    array = run(pipe, output_type="np")
    assert array.shape == (2, 3, 16, 16, 3) and array.min() >= 0 and array.max() <= 1
    tensor = run(pipe, output_type="pt")
    assert tensor.shape == (2, 3, 3, 16, 16)
    np.testing.assert_allclose(tensor.permute(0, 1, 3, 4, 2).numpy(), array, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[1][2]), (array[1, 2] * 255).round().astype(np.uint8))
    assert isinstance(
        pipe(prompt="x", num_frames=2, height=16, width=16, num_inference_steps=1, return_dict=False), tuple
    )


def test_guidance_scale_one_equals_conditional_on_all_channels():
    cond, uncond = torch.randn(2, 8, 3, 2, 2), torch.randn(2, 8, 3, 2, 2)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0, 4), cond)
    guided = classifier_free_guidance(cond, uncond, 7.0, 4)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])  # learned variance from the conditional branch
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 7.0 * (cond[:, :4] - uncond[:, :4]))


def test_cfg_path_uses_the_null_caption(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args[0].shape[0], kwargs["drop_text"].tolist())),
        with_kwargs=True,
    )
    try:
        guided = run(pipe, guidance_scale=7.0)
        no_guidance = run(pipe, guidance_scale=1.0)
        # the CFG path at w = 1 (just above: 1 + 1e-6 enables it) reproduces the conditional-only sampler
        almost_one = run(pipe, guidance_scale=1.0 + 1e-6)
        negative = run(pipe, guidance_scale=7.0, negative_prompt="blurry")
    finally:
        handle.remove()
    assert calls[0] == (4, [False, False, True, True])  # cond rows, then null-caption rows
    assert calls[3] == (2, [False, False])
    assert calls[-1] == (4, [False, False, False, False])  # negative prompt: encoded text, no null caption
    torch.testing.assert_close(almost_one, no_guidance, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided, no_guidance, atol=1e-3)
    assert not torch.allclose(negative, guided, atol=1e-3)


def test_num_videos_per_prompt_and_generator_list(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    out = run(pipe, num_videos_per_prompt=2, generator=generators, guidance_scale=3.0)
    assert out.shape[0] == 4
    with pytest.raises(ValueError, match="generator"):
        run(pipe, generator=generators[:3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 12}, "height: expected a positive multiple of 16"),
        ({"width": 0}, "width"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "gif"}, "output_type"),
        ({"prompt": [1, 2]}, "prompt: expected"),
        ({"prompt": None}, "exactly one of prompt and prompt_embeds"),
        ({"negative_prompt": ["a", "b", "c"], "guidance_scale": 2.0}, "negative_prompt"),
        ({"max_sequence_length": 99}, r"max_sequence_length: expected an int in \[1, 24\]"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"num_videos_per_prompt": 0}, "num_videos_per_prompt"),
        ({"latents": torch.zeros(1, 4, 3, 2, 2)}, "latents: expected shape"),
        ({"prompt": None, "prompt_embeds": torch.zeros(2, 5, 3)}, "prompt_embeds"),
    ],
)
def test_check_inputs_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


def test_prompt_embeds_match_prompt(pipe):
    embeds, mask = pipe.encode_prompt(PROMPTS, 24)
    torch.testing.assert_close(run(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask), run(pipe))


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = MVDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is MVDiTTransformer3DModel
    assert loaded.scheduler.config.variance_type == "learned_range"
    torch.testing.assert_close(run(loaded, guidance_scale=4.0), run(pipe, guidance_scale=4.0), rtol=0, atol=1e-6)


def test_st_vae_pipeline_frame_counts():
    pipe = make_pipeline(vae=build_st_vae("tiny"))
    frames = pipe(prompt=PROMPTS[0], num_frames=9, height=16, width=16, num_inference_steps=2, output_type="np").frames
    assert frames.shape == (1, 9, 16, 16, 3)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        pipe(prompt=PROMPTS[0], num_frames=6, height=16, width=16, num_inference_steps=1)


def test_flow_pipeline_and_scheduler_swap():
    pipe = make_pipeline(objective="flow")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert run(pipe, guidance_scale=3.0).shape == (2, 4, 3, 2, 2)
    # a learned-variance scheduler needs a learn_sigma transformer
    pipe.scheduler = TextToVideoObjective("ddpm").make_scheduler()
    with pytest.raises(ValueError, match="learn_sigma"):
        run(pipe)
    # DDIM from the DDPM config ignores the variance channels of a learn_sigma model
    ddpm_pipe = make_pipeline()
    ddpm_pipe.scheduler = DDIMScheduler.from_config(ddpm_pipe.scheduler.config)
    assert run(ddpm_pipe).shape == (2, 4, 3, 2, 2)


def test_video_latent_round_trip_shapes():
    vae = build_image_vae("tiny")
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    latents = encode_video_latents(vae, video, sample_posterior=False)
    assert latents.shape == (2, 4, 4, 2, 2)
    # per-frame VAE: frame i of the clip is encoded on its own
    single = encode_video_latents(vae, video[:, :, 1:2], sample_posterior=False)
    torch.testing.assert_close(latents[:, :, 1:2], single, rtol=1e-5, atol=1e-5)
    assert decode_video_latents(vae, latents).shape == (2, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="video: expected"):
        encode_video_latents(vae, video[:, :2])


def test_export_video(tmp_path):
    # smooth moving gradients (random noise is the worst case for H.264 with 4:2:0 chroma)
    ys, xs = np.mgrid[0:18, 0:22] / 22.0
    frames = np.stack([np.stack([xs + 0.05 * t, ys, 0.5 + 0 * xs], -1) for t in range(5)]).clip(0, 1)
    mp4 = export_video(frames, tmp_path / "clip.mp4", fps=8)
    decoded = read_frames(mp4)
    assert decoded.shape == (5, 18, 22, 3)
    assert np.abs(decoded.astype(float) - frames * 255).mean() < 6  # lossy, but the same clip
    gif = export_video([PIL.Image.fromarray((f * 255).astype(np.uint8)) for f in frames], tmp_path / "clip.gif")
    with PIL.Image.open(gif) as image:
        assert image.n_frames == 5 and image.size == (22, 18)
    odd = export_video(torch.rand(3, 3, 15, 17), tmp_path / "odd.mp4")  # (T, 3, H, W), odd sizes padded
    assert read_frames(odd).shape == (3, 16, 18, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        export_video(frames, tmp_path / "clip.avi")


# ---------------------------------------------------------------------------------------------------------------------
# diffusers pipeline features: CPU offload, step callbacks, interruption, generator-free samplers


@pytest.mark.parametrize("vae", ["image", "st_vae", "pixel"])
def test_model_cpu_offload_gives_the_same_answer(vae):
    """enable_model_cpu_offload (accelerate hooks; the CPU stands in for the accelerator) changes no output."""
    from genvis.models import PixelUnshuffleAutoencoder

    vaes = {"image": lambda: None, "st_vae": lambda: build_st_vae("tiny"), "pixel": PixelUnshuffleAutoencoder}
    pipe = make_pipeline(vae=vaes[vae]())
    frames = 1 if vae == "st_vae" else 2
    expected = run(pipe, num_frames=frames, guidance_scale=3.0, output_type="pt")
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and hasattr(pipe.text_encoder, "_hf_hook")
    assert hasattr(pipe.vae, "_hf_hook") == (vae != "pixel")  # nothing to offload in the parameter-free autoencoder
    for _ in range(2):
        torch.testing.assert_close(run(pipe, num_frames=frames, guidance_scale=3.0, output_type="pt"), expected)
    pipe.remove_all_hooks()


def test_sequential_cpu_offload_on_the_cpu_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match=r"enable_sequential_cpu_offload\(device='cpu'\).*accelerator"):
        pipe.enable_sequential_cpu_offload(device="cpu")


def test_callback_on_step_end_and_interrupt(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        assert pipeline.num_timesteps == 3 and pipeline.guidance_scale == 4.0
        seen.append((step, {name: tuple(t.shape) for name, t in tensors.items()}, tensors["latents"].clone()))
        return tensors

    names = ["latents", "prompt_embeds", "prompt_attention_mask"]
    plain = run(pipe, guidance_scale=4.0)
    torch.testing.assert_close(
        run(pipe, guidance_scale=4.0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names), plain
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1]["prompt_embeds"][0] == 4 and seen[0][1]["prompt_attention_mask"][0] == 4  # cond + uncond rows
    torch.testing.assert_close(seen[-1][2], plain)

    # returned tensors replace the pipeline's: zeroed text embeddings change the answer
    def blank_text(pipeline, step, timestep, tensors):
        return {"prompt_embeds": torch.zeros_like(tensors["prompt_embeds"])}

    blank = run(pipe, guidance_scale=4.0, callback_on_step_end=blank_text,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    assert not torch.allclose(blank, plain)

    def stop(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        seen.append(tensors["latents"].clone())
        return tensors

    interrupted = run(pipe, guidance_scale=4.0, callback_on_step_end=stop)
    torch.testing.assert_close(interrupted, seen[-1])  # the latents after step 0 are the answer
    assert not torch.allclose(interrupted, plain)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs: \['condition'\] not among"):
        run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["condition"])


def test_samplers_whose_step_takes_no_generator():
    """UniPC / PNDM / Heun / LMS / DEIS take no generator= in step(); the pipeline passes it only where accepted."""
    from diffusers import UniPCMultistepScheduler

    ddpm = make_pipeline()
    ddpm.scheduler = UniPCMultistepScheduler.from_config(ddpm.scheduler.config)
    first, second = run(ddpm), run(ddpm)
    assert first.shape == (2, 4, 3, 2, 2) and torch.isfinite(first).all() and torch.equal(first, second)
