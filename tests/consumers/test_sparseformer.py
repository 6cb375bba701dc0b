"""SparseFormer bootstrapped from a genvis ViT: RoI/sampling unit checks, exact inheritance, freezing, save/load, FLOPs,
and the demonstration that 49 learned tokens recover a shapes-trained teacher's representation better than 49 random
or 7x7-pooled teacher tokens through the same frozen blocks."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from genvis.encoders import VisionTransformerModel
from genvis.models.sparseformer import (
    SparseFormerModel,
    initial_rois,
    roi_sampling_points,
    sparseformer_alignment_loss,
    token_subset_baseline,
)
from genvis.models.sparseformer import _sample as sample_points

ROOT = Path(__file__).resolve().parents[2]


def _train_module():
    spec = importlib.util.spec_from_file_location("train_sparseformer", ROOT / "train" / "sparseformer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _teacher(num_layers: int = 3, **kwargs) -> VisionTransformerModel:
    torch.manual_seed(0)
    config = {
        "patch_size": 4,
        "num_layers": num_layers,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "mlp_hidden_dim": 64,
        "position_embedding_type": "learned",
        "pos_embed_grid_size": [16, 16],
        "pos_embed_cls": True,
        **kwargs,
    }
    return VisionTransformerModel(**config).eval()


def _flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def test_zero_delta_roi_adjust_is_identity_and_points_stay_inside_rois():
    model = SparseFormerModel.from_vit(_teacher())
    images = torch.randn(2, 3, 64, 64)
    feature_map = model.embed_tokens(images)
    tokens = model.latent_embed.expand(2, -1, -1)
    rois = model.roi_embed.expand(2, -1, -1)
    _, new_rois, points = model.focus(tokens, rois, feature_map)
    torch.testing.assert_close(new_rois, rois)  # zero-init RoI head
    # arbitrary raw offsets still land inside their RoI after (o - mean) / (3 std) normalisation
    offsets = torch.randn(2, 49, 9, 2) * 5
    points = roi_sampling_points(rois, offsets)
    low, high = rois[:, :, None, :2] - rois[:, :, None, 2:] / 2, rois[:, :, None, :2] + rois[:, :, None, 2:] / 2
    assert ((points >= low - 1e-6) & (points <= high + 1e-6)).all()
    # the initial RoIs tile the image: 7x7 cells of side 1/7
    torch.testing.assert_close(initial_rois(49)[8], torch.tensor([1.5 / 7, 1.5 / 7, 1 / 7, 1 / 7]))


def test_sampling_a_constant_map_returns_the_constant_and_pixel_centres_exactly():
    constant = torch.full((1, 5, 8, 8), 3.25)
    points = torch.rand(1, 4, 6, 2)
    torch.testing.assert_close(sample_points(constant, points, "border"), torch.full((1, 4, 6, 5), 3.25))
    ramp = torch.arange(64.0).reshape(1, 1, 8, 8)
    centre = torch.tensor([[[[2.5 / 8, 5.5 / 8]]]])  # (x, y) of pixel row 5, column 2
    assert sample_points(ramp, centre, "zeros").item() == 5 * 8 + 2


def test_cortex_with_teacher_tokens_reproduces_the_teacher():
    teacher = _teacher()
    images = torch.randn(2, 3, 64, 64)
    model = SparseFormerModel.from_vit(teacher, num_cortex_layers=3)
    tokens = model.embed_tokens(images).flatten(2).transpose(1, 2)  # the teacher's 256 input tokens
    cls, patch_tokens = model.forward_cortex(tokens)
    reference = teacher(images)
    torch.testing.assert_close(cls, reference.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch_tokens.reshape(-1, teacher.dim), reference.patch_tokens, atol=1e-5, rtol=1e-5)
    # default depth: the teacher's last 2/3 blocks, copied
    default = SparseFormerModel.from_vit(_teacher(num_layers=6))
    assert default.config.num_cortex_layers == 4
    torch.testing.assert_close(default.blocks[0].attn.to_q.weight, _teacher(num_layers=6).blocks[2].attn.to_q.weight)


def test_only_focusing_parts_and_unlocked_blocks_are_trainable_and_round_trip(tmp_path):
    teacher = _teacher()
    model = SparseFormerModel.from_vit(teacher, trainable_cortex_layers=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    inherited = set(model.inherited_parameter_names())
    assert trainable & inherited == {n for n in inherited if n.startswith("blocks.0.")}
    assert {"roi_embed", "latent_embed", "align_proj.weight", "transition.weight"} <= trainable
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token", "blocks.1.", "norm.")) for n in trainable)

    with torch.no_grad():
        model.focus.roi_adjust.bias.fill_(0.1)  # non-default weights must survive the round trip
    model.save_pretrained(tmp_path)
    loaded = SparseFormerModel.from_pretrained(tmp_path).eval()
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output)
    torch.testing.assert_close(got.rois, expected.rois)
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="position_embedding_type"):
        SparseFormerModel.from_vit(_teacher(position_embedding_type="rope", pos_embed_grid_size=None))
    with pytest.raises(ValueError, match="num_cortex_layers"):
        SparseFormerModel.from_vit(_teacher(), num_cortex_layers=4)
    model = SparseFormerModel.from_vit(_teacher())
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="trainable_cortex_layers"):
        SparseFormerModel(num_cortex_layers=2, trainable_cortex_layers=3)
    with pytest.raises(ValueError, match="square"):
        token_subset_baseline(_teacher(), torch.randn(1, 3, 64, 64), 48, "pool")


def test_forward_flops_are_well_below_the_teacher():
    teacher = _teacher(mlp_hidden_dim=128)
    images = torch.randn(2, 3, 64, 64)
    for cortex in (2, 3):
        student = SparseFormerModel.from_vit(teacher, num_cortex_layers=cortex).eval()
        ratio = _flops(teacher, images) / _flops(student, images)
        assert ratio > 2.5, f"{cortex} cortex blocks: teacher/student FLOPs {ratio:.2f}"


@pytest.mark.slow
def test_49_learned_tokens_recover_the_teacher_better_than_random_or_pooled_tokens():
    train = _train_module()
    config = train.TrainConfig()
    config.teacher.steps, config.teacher.batch_size = 150, 32  # tiny.yaml
    images, labels = train.scene_batch(256, 64, seed=0)
    eval_images, eval_labels = train.scene_batch(48, 64, seed=10**6)
    teacher, head = train.pretrain_shapes_teacher(config.teacher, images, labels, show_progress=False)
    config.model.num_cortex_layers = 3  # all teacher blocks, frozen (tiny.yaml)
    student = train.build_student(teacher, config.model)
    roi_init = student.roi_embed.detach().clone()

    before = train.evaluate_alignment(student, teacher, eval_images)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=80, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    roi_grad_seen = False
    for _ in range(80):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        with torch.no_grad():
            target = teacher(batch).pooler_output
        loss = sparseformer_alignment_loss(student(batch).pooler_output, target)
        loss.backward()
        roi_grad_seen |= bool(student.roi_embed.grad is not None and student.roi_embed.grad.abs().sum() > 0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    after = train.evaluate_alignment(student, teacher, eval_images, eval_labels, head)

    assert roi_grad_seen
    assert (student.roi_embed.detach() - roi_init).abs().max() > 1e-3  # the RoIs moved
    assert after["cos/student"] > before["cos/student"] + 0.005, (before, after)  # measured 0.943 -> 0.961
    torch.testing.assert_close(before["cos/student"], before["cos/grid_tokens"], atol=1e-4, rtol=0)  # untrained = grid
    assert after["cos/student"] > after["cos/grid_tokens"] + 0.005, after
    assert after["cos/student"] > after["cos/random_tokens"] + 0.03, after  # measured 0.961 vs 0.879
    assert after["cos/student"] > after["cos/pooled_tokens"] + 0.1, after  # measured 0.961 vs 0.781
    # the teacher's probe works on student features nearly as well as on the teacher's own
    assert after["probe_acc/student"] > after["probe_acc/teacher"] - 0.05, after
    assert F.cosine_similarity(student.roi_embed, roi_init, dim=-1).min() < 1.0


def test_training_script_runs_exports_and_resumes(tmp_path):
    train = _train_module()
    args = [
        "--set", f"output_dir={tmp_path}",
        "--set", "data.image_size=32",
        "--set", "data.num_train_images=16",
        "--set", "data.num_eval_images=4",
        "--set", "data.use_builtin_images=false",
        "--set", "teacher.steps=3",
        "--set", "teacher.batch_size=4",
        "--set", "optim.batch_size=4",
        "--set", "checkpoint.every_steps=2",
        "--set", "logging.eval_every_steps=2",
    ]  # fmt: skip
    train.main([*args, "--set", "schedule.max_steps=2"])
    teacher_weights = (tmp_path / "teacher" / "diffusion_pytorch_model.safetensors").read_bytes()
    train.main([*args, "--set", "schedule.max_steps=4"])  # resumes at step 2 and reuses the saved teacher
    assert (tmp_path / "teacher" / "diffusion_pytorch_model.safetensors").read_bytes() == teacher_weights
    student = SparseFormerModel.from_pretrained(tmp_path / "student")
    assert student.config.num_latent_tokens == 49 and student.config.num_cortex_layers == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))[
        -1
    ].endswith("4")
