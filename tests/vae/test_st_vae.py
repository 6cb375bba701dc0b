"""ST-VAE: presets, save/load, frame rules, LaVin-vs-diffusers temporal upsampling, normalisation, losses, overfit."""

import json

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

from genvis.vae import (
    OFFICIAL_SCALING_FACTOR,
    OFFICIAL_SHIFT_FACTOR,
    AutoencoderKLSTVAE,
    STVAECausalConv3d,
    STVAEUpsample3D,
    build_st_vae,
    check_num_frames,
    decode_latents,
    denormalize_latents,
    encode_frames,
    estimate_latent_normalization,
    latent_normalization,
    latent_num_frames,
    load_lavin_st_vae,
    normalize_latents,
    posterior,
    set_latent_normalization,
    st_vae_config,
)
from genvis.vae.losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_discriminator_loss,
    kl_loss,
    psnr,
    reconstruction_loss,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """The tiny VAE's small 3-D convs run ~5x cheaper on one thread on the shared 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return build_st_vae("tiny").eval()


def _pixels(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_official_preset_matches_the_released_layout():
    with torch.device("meta"):
        official = build_st_vae("official")
        diffusers_default = AutoencoderKLCogVideoX()
    assert sum(p.numel() for p in official.parameters()) == 215_583_907  # 215.6 M (spec §2.1)
    ours, reference = official.state_dict(), diffusers_default.state_dict()
    assert len(ours) == 436 and ours.keys() == reference.keys()
    assert all(ours[key].shape == reference[key].shape for key in ours)
    assert latent_normalization(official) == (OFFICIAL_SHIFT_FACTOR, OFFICIAL_SCALING_FACTOR)
    assert sum(isinstance(module, STVAEUpsample3D) for module in official.modules()) == 2  # the two S&T up blocks


def test_config_errors():
    with pytest.raises(ValueError, match="preset"):
        st_vae_config("huge")
    with pytest.raises(ValueError, match="norm_num_groups"):
        st_vae_config("tiny", block_out_channels=[12, 32, 64, 64])
    with pytest.raises(ValueError, match=r"unknown ST-VAE config field\(s\) \['block_channels'\]"):
        st_vae_config("tiny", block_channels=[32, 32, 64, 64])


def test_save_pretrained_round_trip(tmp_path, tiny_vae):
    set_latent_normalization(tiny_vae, 0.25, 1.5)
    tiny_vae.save_pretrained(tmp_path)
    loaded = AutoencoderKLSTVAE.from_pretrained(tmp_path)
    loaded_config, saved_config = (json.loads(vae.to_json_string()) for vae in (loaded, tiny_vae))
    loaded_config.pop("_name_or_path")
    assert loaded_config == saved_config
    assert latent_normalization(loaded) == (0.25, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(tiny_vae.state_dict().values(), loaded.state_dict().values()))
    assert sum(isinstance(module, STVAEUpsample3D) for module in loaded.modules()) == 2
    pixels = _pixels(1, 3, 5, 16, 16)
    assert torch.equal(encode_frames(tiny_vae, pixels, mode="mode"), encode_frames(loaded, pixels, mode="mode"))


@pytest.mark.parametrize(("num_frames", "latent_frames"), [(1, 1), (5, 2), (9, 3)])
def test_image_and_video_shapes(tiny_vae, num_frames, latent_frames):
    pixels = _pixels(2, 3, num_frames, 16, 24)
    with torch.no_grad():
        latents = encode_frames(tiny_vae, pixels, mode="mode")
        decoded = decode_latents(tiny_vae, latents)
    assert latents.shape == (2, 16, latent_frames, 2, 3)
    assert latent_num_frames(num_frames) == latent_frames
    assert decoded.shape == pixels.shape


def test_images_are_one_frame_clips(tiny_vae):
    images = _pixels(2, 3, 16, 16)
    with torch.no_grad():
        from_images = encode_frames(tiny_vae, images, mode="mode")
        from_clips = encode_frames(tiny_vae, images.unsqueeze(2), mode="mode")
    assert from_images.shape == (2, 16, 1, 2, 2) and torch.equal(from_images, from_clips)


@pytest.mark.parametrize("num_frames", [0, 2, 4, 6, 8])
def test_bad_frame_counts_are_rejected(tiny_vae, num_frames):
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        check_num_frames(num_frames)
    if num_frames:
        with pytest.raises(ValueError, match="num_frames"):
            encode_frames(tiny_vae, _pixels(1, 3, num_frames, 16, 16))


def test_bad_shapes_are_rejected(tiny_vae):
    with pytest.raises(ValueError, match="divisible by 8"):
        encode_frames(tiny_vae, _pixels(1, 3, 1, 20, 16))
    with pytest.raises(ValueError, match="pixels"):
        encode_frames(tiny_vae, _pixels(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        decode_latents(tiny_vae, torch.zeros(1, 8, 1, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        encode_frames(tiny_vae, _pixels(1, 3, 1, 16, 16), mode="mean")


def test_lavin_upsampling_differs_from_diffusers_only_for_even_latent_counts(tiny_vae):
    reference = AutoencoderKLCogVideoX(**st_vae_config("tiny")).eval()
    reference.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        for num_frames in (1, 9):  # odd latent counts: the same outputs (spec §2.3)
            pixels = _pixels(1, 3, num_frames, 16, 16)
            ours = encode_frames(tiny_vae, pixels, mode="mode")
            decoded = decode_latents(tiny_vae, ours)
            theirs = encode_frames(reference, pixels, mode="mode")
            if num_frames == 1:  # the image fast path sums the kernel over time: equal up to float rounding
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    decoded, reference.decode(denormalize_latents(ours, tiny_vae)).sample, atol=1e-5, rtol=1e-4
                )
            else:  # clips take diffusers' own conv path: bit-identical
                assert torch.equal(ours, theirs)
                assert torch.equal(decoded, reference.decode(denormalize_latents(ours, tiny_vae)).sample)
        latents = encode_frames(tiny_vae, _pixels(1, 3, 5, 16, 16), mode="mode")  # 2 latent frames
        assert (
            reference.decode(denormalize_latents(latents, reference)).sample.shape[2] == 8
        )  # diffusers: 2x every frame
        assert decode_latents(tiny_vae, latents).shape[2] == 5
        with pytest.raises(ValueError, match="AutoencoderKLSTVAE"):
            decode_latents(reference, latents)


def test_image_fast_path_matches_the_3d_conv_in_outputs_gradients_and_cache():
    torch.manual_seed(0)
    for kernel in (3, 1):
        fast = STVAECausalConv3d(4, 6, kernel_size=(kernel, 3, 3))
        slow = CogVideoXCausalConv3d(4, 6, kernel_size=(kernel, 3, 3))
        slow.load_state_dict(fast.state_dict())  # same state-dict keys
        image = torch.randn(2, 4, 1, 8, 8, requires_grad=True)
        (out_fast, cache_fast), (out_slow, cache_slow) = fast(image), slow(image)
        torch.testing.assert_close(out_fast, out_slow, atol=1e-5, rtol=1e-4)
        assert torch.equal(cache_fast, cache_slow)
        grad_fast = torch.autograd.grad(out_fast.square().sum(), [image, fast.conv.weight])
        grad_slow = torch.autograd.grad(out_slow.square().sum(), [image, slow.conv.weight])
        for a, b in zip(grad_fast, grad_slow):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        clip = torch.randn(1, 4, 3, 8, 8)  # more than one frame, or a cache: diffusers' path, bit-identical
        assert torch.equal(fast(clip)[0], slow(clip)[0])
        assert torch.equal(fast(image, cache_slow)[0], slow(image, cache_slow)[0])
    vae = build_st_vae("tiny")
    assert not any(type(m) is CogVideoXCausalConv3d for m in vae.modules())  # every causal conv is the fast one
    assert any(type(m) is STVAECausalConv3d for m in vae.modules())


def test_latent_normalisation_inverse_and_estimate(tiny_vae):
    latents = torch.randn(2, 16, 2, 2, 2)
    official = build_st_vae("tiny", shift_factor=OFFICIAL_SHIFT_FACTOR, scaling_factor=OFFICIAL_SCALING_FACTOR)
    normalized = normalize_latents(latents, official)
    assert torch.allclose(normalized, (latents - 0.032470703125) * 1.08936170213)
    assert torch.allclose(denormalize_latents(normalized, official), latents, atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        set_latent_normalization(official, 0.0, 0.0)
    batches = [_pixels(4, 3, 1, 16, 16), _pixels(2, 3, 5, 16, 16)]
    shift, scale = estimate_latent_normalization(tiny_vae, batches, mode="mode")
    set_latent_normalization(tiny_vae, shift, scale)
    with torch.no_grad():
        normalized = torch.cat([encode_frames(tiny_vae, batch, mode="mode").flatten() for batch in batches])
    assert abs(float(normalized.mean())) < 1e-4 and abs(float(normalized.std()) - 1.0) < 1e-2


def test_posterior_sample_vs_mode(tiny_vae):
    pixels = _pixels(1, 3, 1, 16, 16)
    with torch.no_grad():
        mode = encode_frames(tiny_vae, pixels, mode="mode", normalize=False)
        first = encode_frames(tiny_vae, pixels, generator=torch.Generator().manual_seed(3), normalize=False)
        second = encode_frames(tiny_vae, pixels, generator=torch.Generator().manual_seed(3), normalize=False)
        distribution = posterior(tiny_vae, pixels)
    assert torch.equal(mode, distribution.mean)
    assert torch.equal(first, second) and not torch.equal(first, mode)


def test_load_lavin_checkpoint_layout(tmp_path, tiny_vae):
    path = tmp_path / "stvae.pt"
    torch.save({"state_dict": tiny_vae.state_dict()}, path)
    loaded = load_lavin_st_vae(path, preset="tiny")
    assert isinstance(loaded, AutoencoderKLSTVAE)
    assert all(torch.equal(a, b) for a, b in zip(tiny_vae.state_dict().values(), loaded.state_dict().values()))
    broken = dict(tiny_vae.state_dict())
    broken.pop("decoder.conv_out.conv.weight")
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError, match="missing"):
        load_lavin_st_vae(path, preset="tiny")


def test_losses_and_discriminator():
    target = _pixels(2, 3, 1, 16, 16)
    assert torch.all(psnr(target, target) > 90)
    noisy = (target + 0.1).clamp(-1, 1)
    assert torch.all((psnr(noisy, target) > 20) & (psnr(noisy, target) < 30))
    assert float(reconstruction_loss(target, target)) == 0.0
    standard = type("Posterior", (), {"mean": torch.zeros(3), "var": torch.ones(3), "logvar": torch.zeros(3)})
    assert float(kl_loss(standard)) == 0.0
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    logits = discriminator(_pixels(3, 3, 32, 32))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1  # one logit per patch
    with pytest.raises(ValueError, match="fewer discriminator layers"):
        discriminator(_pixels(1, 3, 8, 8))
    assert float(hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    weight = torch.nn.Parameter(torch.ones(3))
    ratio = adaptive_gan_weight((weight * 4).sum(), (weight * 2).sum(), weight)
    assert abs(float(ratio) - 2.0) < 1e-3


@pytest.mark.slow
def test_tiny_st_vae_overfits_a_few_images():
    """4 fixed 16 px images: PSNR rises from < 12 dB at init to > 20 dB in 60 steps (~23 dB measured; ~15 s)."""
    torch.manual_seed(0)
    vae = build_st_vae("tiny")
    images = torch.stack(
        [
            torch.linspace(-1, 1, 16).view(1, 1, 16).expand(3, 16, 16),
            torch.linspace(-1, 1, 16).view(1, 16, 1).expand(3, 16, 16),
            torch.tensor([0.8, -0.2, -0.6]).view(3, 1, 1).expand(3, 16, 16),
            (torch.arange(16).view(16, 1) // 4 + torch.arange(16) // 4) % 2 * 1.6 - 0.8 + torch.zeros(3, 1, 1),
        ]
    ).unsqueeze(2)  # (4, 3, 1, 16, 16)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)

    def current_psnr() -> float:
        with torch.no_grad():
            return float(psnr(decode_latents(vae, posterior(vae, images).mode(), denormalize=False), images).mean())

    initial = current_psnr()
    for _ in range(60):
        distribution = posterior(vae, images)
        reconstruction = decode_latents(vae, distribution.sample(), denormalize=False)
        loss = reconstruction_loss(reconstruction, images) + 1e-4 * kl_loss(distribution)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = current_psnr()
    assert initial < 12.0 and final > 20.0, (initial, final)
