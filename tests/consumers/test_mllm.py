"""MLLM vision tower: genvis ViT + 2x2 merger + chunk aggregator feeding a tiny transformers causal LM."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genvis.data import procedural_scene
from genvis.models.vision_tower import (
    VisionLanguageModel,
    VisionLanguageProcessor,
    VisionTowerModel,
    tiny_text_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _model(model_type: str = "qwen2") -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.from_configs(tiny_text_config(model_type))


def _batch(processor: VisionLanguageProcessor) -> dict:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 48, generator=g)]
    video = torch.rand(5, 3, 32, 32, generator=g)
    return processor(
        ["<image>What colour? ", "<image> and <video> how many? "], images=images, videos=[video], answers=["red", "2"]
    )


@pytest.fixture(scope="module")
def model_and_processor():
    model = _model()
    return model, VisionLanguageProcessor.from_model(model)


def test_placeholder_counts_and_labels(model_and_processor):
    model, processor = model_and_processor
    batch = _batch(processor)
    # 32x32 image: 4x4 patches -> 2x2 merged = 4 tokens; 32x48 -> 6; video 5 frames -> 3 chunks of 2 -> 3 * 2 * 4
    assert (batch["input_ids"] == model.config.image_token_id).sum().item() == 4 + 6
    assert (batch["input_ids"] == model.config.video_token_id).sum().item() == 3 * 2 * 4
    assert batch["video_chunks"].tolist() == [3] and batch["video_chunk_times"].tolist() == [0.0, 1.0, 2.0]
    # labels only on the answer (+ EOS); left padding
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == [*processor._tokenize("red"), processor.tokenizer.eos_token_id]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()


def test_bad_inputs_raise(model_and_processor):
    model, processor = model_and_processor
    batch = _batch(processor)
    with pytest.raises(ValueError, match="placeholders"):
        model(**{**batch, "input_ids": batch["input_ids"][:, 1:], "attention_mask": None, "labels": None})
    with pytest.raises(ValueError, match="no image pixels"):
        model(batch["input_ids"])
    with pytest.raises(ValueError, match="more <image> markers"):
        processor(["<image><image>"], images=[torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="out_dim"):
        VisionLanguageModel(VisionTowerModel(out_dim=32), model.language_model, 259, 260)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_every_trainable_parameter_gets_a_gradient(model_type):
    model = _model(model_type)
    _leave_zero_init(model.vision_tower)
    processor = VisionLanguageProcessor.from_model(model)
    loss = model(**_batch(processor)).loss
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert torch.isfinite(loss) and not missing, missing


def _leave_zero_init(tower: VisionTowerModel) -> None:
    """Move the zero-initialised output projections off zero (else the layers before them get no gradient)."""
    for linear in [tower.time_proj] + [m for b in tower.aggregator for m in (b.attn.to_out, b.mlp.fc2)]:
        torch.nn.init.normal_(linear.weight, std=0.2)


def test_aggregator_uses_chunk_order_and_encoder_is_chunk_local():
    torch.manual_seed(0)
    tower = VisionTowerModel()
    _leave_zero_init(tower)
    processor = VisionLanguageProcessor.from_model(VisionLanguageModel(tower, _model().language_model, 259, 260))
    video = torch.rand(6, 3, 32, 32)
    batch = processor(["<video>"], videos=[video])
    grid, pixels = batch["video_grid_thw"], batch["pixel_values_videos"]
    tokens = tower(pixels, grid, batch["video_chunks"], batch["video_chunk_times"]).tokens
    # same chunks, but the time positions say they come in the reverse order
    reversed_times = tower(pixels, grid, batch["video_chunks"], batch["video_chunk_times"].flip(0)).tokens
    assert (tokens - reversed_times).abs().max() > 1e-3
    # intra-chunk encoder: the merged tokens of chunk 0 do not depend on the other chunks
    enc = tower.encoder
    per_chunk = grid.prod(-1).tolist()
    alone = enc(pixels[: per_chunk[0]], grid[:1]).merged_tokens
    together = enc(pixels, grid).merged_tokens[: alone.shape[0]]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip_full_and_lora(tmp_path, model_and_processor):
    model, processor = model_and_processor
    batch = _batch(processor)
    model.save_pretrained(tmp_path / "full")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)

    lora_model = VisionLanguageModel.from_pretrained(tmp_path / "full")
    lora_model.enable_lora(r=4)
    for name, param in lora_model.named_parameters():  # make the adapter non-trivial (lora_B starts at zero)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    lora_model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "lora" / "adapter.safetensors").is_file()
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "lora")
    with torch.no_grad():
        expected = lora_model(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=0, rtol=0)
        assert (expected - model(**batch).logits).abs().max() > 1e-4  # the adapter changed the output


def test_lora_trains_only_adapters(model_and_processor):
    model, processor = model_and_processor
    model = VisionLanguageModel(
        VisionTowerModel.from_config(model.vision_tower.config), _model().language_model, 259, 260
    )
    model.enable_lora(r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**_batch(processor)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


def _background_questions(count: int) -> tuple[list[torch.Tensor], list[str]]:
    scenes = [procedural_scene(seed, size=32, num_shapes=(1, 2)) for seed in range(count)]
    images = [torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))) for s in scenes]
    return images, [s.background for s in scenes]


@torch.no_grad()
def _accuracy(model, processor, images, answers) -> float:
    prompts = ["<image>What colour is the background? "] * len(images)
    new = model.generate(**processor(prompts, images=images), max_new_tokens=8, do_sample=False)
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return float(np.mean([t.strip() == a for t, a in zip(texts, answers)]))


@pytest.mark.slow
def test_overfit_lm_answers_from_the_image():
    """The LM learns the background colour (5 names) of 16 scenes; with a grey image it can only guess."""
    model = _model()
    processor = VisionLanguageProcessor.from_model(model)
    images, answers = _background_questions(16)
    prompts = ["<image>What colour is the background? "] * 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        half = slice((step % 2) * 8, (step % 2) * 8 + 8)
        batch = processor(prompts[half], images=images[half], answers=answers[half])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with_image = _accuracy(model, processor, images, answers)
    blank = _accuracy(model, processor, [torch.full_like(i, 128) for i in images], answers)
    majority = max(answers.count(a) for a in set(answers)) / len(answers)
    assert with_image >= 0.9, (with_image, blank)
    assert blank <= majority + 1e-6 and blank <= 0.5, (with_image, blank)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"train_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_script_checkpoints_and_resumes(tmp_path):
    """train/mllm.py (LoRA) runs 2 steps with a checkpoint, then a second invocation resumes to step 3."""
    script = _load_script("mllm")
    common = [
        f"--set=output_dir={tmp_path}",
        "--set=data.num_train=4",
        "--set=data.num_eval=2",
        "--set=optim.batch_size=2",
        "--set=checkpoint.every_steps=2",
        "--set=logging.every=1",
        "--set=model.lora=true",
    ]
    script.main([*common, "--set=schedule.max_steps=2"])
    assert (tmp_path / "checkpoints" / "checkpoint-00000002" / "model" / "lora" / "adapter.safetensors").is_file()
    metrics = script.main([*common, "--set=schedule.max_steps=3"])
    assert metrics["steps"] == 3 and np.isfinite(metrics["final_loss"])
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))
    VisionLanguageModel.from_pretrained(tmp_path / "model")
