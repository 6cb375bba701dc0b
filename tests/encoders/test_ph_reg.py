"""PH-Reg: TTA geometry on an equivariant teacher, and distillation removing a position-locked artifact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genvis.encoders import VisionTransformerModel
from genvis.encoders.ph_reg import (
    add_register_tokens,
    artifact_report,
    dense_patch_features,
    ph_reg_loss,
    sample_view_offsets,
    shift_flip_views,
    tta_denoise,
    unlock_ph_reg_parameters,
)

PATCH = 4


def _patch_means(images: torch.Tensor) -> torch.Tensor:
    """A shift- and flip-equivariant teacher: each token is its patch's mean colour."""
    return F.avg_pool2d(images, PATCH).flatten(2).transpose(1, 2)  # (N, h*w, C)


def test_offsets_are_spread_and_start_at_zero():
    offsets = sample_view_offsets(10, 3, torch.Generator().manual_seed(0))
    assert offsets[0].tolist() == [0, 0] and offsets.abs().max() <= 3
    assert len({tuple(o) for o in offsets.tolist()}) == 10  # farthest-point sampling never repeats a point


def test_views_map_back_exactly_and_equivariant_features_are_unchanged():
    images = torch.rand(2, 3, 32, 40)
    offsets = torch.tensor([[0, 0], [2, -1], [-3, 4]])
    views, source = shift_flip_views(images, offsets, torch.tensor([False, True, True]), PATCH, fill_value=1.0)
    tokens = _patch_means(views).reshape(3, 2, 80, 3)
    for view in range(3):
        valid = source[view] >= 0
        torch.testing.assert_close(tokens[view][:, valid], _patch_means(images)[:, source[view][valid]])
        assert (tokens[view][:, ~valid] == 1.0).all()  # fill shows where nothing is mapped

    denoised, coverage = tta_denoise(_patch_means, images, PATCH, num_views=8, max_shift_fraction=0.3)
    torch.testing.assert_close(denoised, _patch_means(images))
    assert coverage.min() >= 1
    assert coverage.reshape(8, 10)[3:5, 3:7].eq(8).all()  # the centre is covered by every view


def test_tta_dilutes_a_position_locked_artifact():
    images = torch.rand(4, 3, 32, 32)
    spike = torch.zeros(64, 3)
    spike[[27, 36]] = 50.0  # central positions, covered by every view

    def teacher(views):
        return _patch_means(views) + spike  # the same grid positions in every view

    plain = teacher(images)
    denoised, coverage = tta_denoise(teacher, images, PATCH, num_views=10, max_shift_fraction=0.3)
    assert coverage[[27, 36]].eq(10).all()
    before = artifact_report(plain)["ratio"]
    after = artifact_report(denoised)["ratio"]
    # each view puts the spike on a different original position: about 1/coverage of it stays per position
    assert (after < before / 4).all(), (before, after)


def _teacher_with_artifact() -> tuple[VisionTransformerModel, list[int]]:
    torch.manual_seed(0)
    teacher = VisionTransformerModel(
        patch_size=PATCH,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=16,
        mlp_hidden_dim=64,
        position_embedding_type="learned",
        pos_embed_grid_size=[8, 8],
        pos_embed_cls=True,
        final_norm="none",
    ).eval()
    artifact_positions = [10, 27, 44]
    with torch.no_grad():
        # content-dominated features, as in a trained encoder (a random init is dominated by position embeddings)
        teacher.patch_embed.proj.weight.mul_(8.0)
        # a large fixed vector at a few grid positions: the position-locked artifact
        direction = torch.randn(teacher.dim)
        teacher.pos_embed[[1 + p for p in artifact_positions]] += 20.0 * direction / direction.norm()
    return teacher, artifact_positions


def _patchwise_images(count: int, seed: int) -> torch.Tensor:
    """One colour per patch, so a horizontal flip moves patches without changing them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(32, 32), mode="nearest")


@pytest.fixture
def one_thread():
    # tiny matmuls: with 2 threads on a shared 2-core machine, scheduling overhead dominates (50x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # ~5 s idle, ~11 s on the shared 2-core machine
def test_distilled_registers_remove_the_artifact_and_keep_other_features(one_thread):
    teacher, artifact_positions = _teacher_with_artifact()
    for param in teacher.parameters():
        param.requires_grad_(False)
    student = add_register_tokens(teacher, 4, generator=torch.Generator().manual_seed(1))
    trainable = unlock_ph_reg_parameters(student)
    assert set(trainable) >= {"register_tokens", "pos_embed", "patch_embed.proj.weight", "blocks.2.attn.to_q.weight"}
    assert not any(name.startswith(("blocks.0.", "blocks.1.", "norm.")) for name in trainable)

    def teacher_features(images):
        return dense_patch_features(teacher, images)

    train_images = _patchwise_images(64, seed=0)
    generator = torch.Generator().manual_seed(0)
    targets = torch.cat(
        [
            tta_denoise(teacher_features, batch, PATCH, max_shift_fraction=0.3, generator=generator)[0]
            for batch in train_images.split(16)
        ]
    )
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-3, weight_decay=1e-2)
    student.train()
    losses = []
    for _ in range(200):
        index = torch.randint(0, 64, (16,), generator=generator)
        loss = ph_reg_loss(dense_patch_features(student, train_images[index]), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

    student.eval()
    test_images = _patchwise_images(16, seed=1)
    with torch.no_grad():
        before = teacher_features(test_images)
        after = dense_patch_features(student, test_images)
    artifact = torch.tensor(artifact_positions)
    others = torch.ones(64, dtype=torch.bool)
    others[artifact] = False
    median_before = before.norm(dim=-1)[:, others].median()
    norm_before = before.norm(dim=-1)[:, artifact].mean() / median_before
    norm_after = after.norm(dim=-1)[:, artifact].mean() / after.norm(dim=-1)[:, others].median()
    assert norm_before > 3.0, f"the toy artifact should stand out ({norm_before:.2f}x median)"
    # the denoised targets keep ~1/coverage of the artifact (more near the border), so expect a 4x drop, not zero
    assert norm_after < norm_before / 4, (
        f"artifact norm after PH-Reg {norm_after:.2f}x median (before {norm_before:.2f}x)"
    )
    cosine = F.cosine_similarity(after[:, others], before[:, others], dim=-1).mean()
    assert cosine > 0.85, f"features away from the artifact drifted: mean cos {cosine:.3f}"
    assert artifact_report(after)["fraction_above"].max() == 0


def test_bad_ph_reg_arguments():
    teacher, _ = _teacher_with_artifact()
    with pytest.raises(ValueError, match=r"unknown PH-Reg parts \['head'\]"):
        unlock_ph_reg_parameters(teacher, ["head"])
    with pytest.raises(ValueError, match="no register tokens"):
        unlock_ph_reg_parameters(teacher)
    with pytest.raises(ValueError, match="differ in shape"):
        ph_reg_loss(torch.zeros(2, 4), torch.zeros(2, 5))
