"""serve/ handlers, validation and checkpoint loading, called directly with tiny random-init checkpoints.

Every refusal is checked by its message: the demo shows these messages to people as they are.
"""

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from upload_files import huge_png

from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.pipelines import LaVinDiTPipeline
from serve.handlers import (
    DISPLAY_SIDE,
    fit_square,
    labelled_row,
    preview_uploads,
    run_builtin_task,
    run_chat,
    run_encoder_inspection,
    run_text_to_video,
    run_uploaded_task,
    sampling_defaults,
    trained_tasks,
    upscale,
)
from serve.loading import (
    CheckpointLoadError,
    load_encoder,
    load_family,
    load_slot,
    resolve_pipeline_dir,
    training_config,
)
from serve.validation import (
    InputError,
    UploadLimits,
    check_choice,
    check_int,
    check_number,
    check_text,
    load_image,
    pair_up,
)

SIZE = 32
LIMITS = UploadLimits(max_bytes=64 * 1024, max_pixels=512 * 512, max_side=1024)


def save_image(path: Path, size=(40, 30), color=(200, 30, 30), fmt=None) -> Path:
    PIL.Image.new("RGB", size, color).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def lavin_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = PixelUnshuffleAutoencoder()
    transformer = LaVinDiTTransformer3DModel.from_preset("tiny", in_channels=vae.config.latent_channels)
    folder = tmp_path_factory.mktemp("lavin") / "pipeline"
    LaVinDiTPipeline(transformer, vae, FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lavin(lavin_dir):
    pipe, folder = load_family(lavin_dir, "lavin_dit")
    assert folder == lavin_dir
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------------------
# upload validation


def test_load_image_accepts_and_converts(tmp_path):
    image = load_image(save_image(tmp_path / "a.png", fmt="PNG"), "query image", LIMITS, [tmp_path])
    assert image.mode == "RGB" and image.size == (40, 30)
    rgba = tmp_path / "b.webp"
    PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(rgba)
    assert load_image(rgba, "query image", LIMITS, [tmp_path]).mode == "RGB"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: ((d / "empty.png").write_bytes(b"") and None) or d / "empty.png",
            r"'empty.png' is empty \(0 bytes\)",
        ),
        (
            lambda d: (d / "notes.png").write_text("hello, not an image") and d / "notes.png",
            r"'notes.png' is not an image in an accepted format \(expected PNG, .*starts with b'hello, n'",
        ),
        (lambda d: huge_png(d / "bomb.png", 20000, 20000), r"'bomb.png' is 400.0 MP; the limit is 0.3 MP"),
        (
            lambda d: huge_png(d / "wide.png", 2000, 10),
            r"'wide.png' is 2000x10 = 0.0 MP; the limit is .* 1024 px per side",
        ),
        (lambda d: huge_png(d / "big.png", 600, 600), r"'big.png' is 600x600 = 0.4 MP; the limit is 0.3 MP"),
        (
            lambda d: (d / "big.bmp").write_bytes(b"BM" + os.urandom(70 * 1024)) and d / "big.bmp",
            r"'big.bmp' is 70.0 KiB; the limit is 64.0 KiB",
        ),
        (lambda d: save_image(d / "scan.tif", fmt="TIFF"), r"'scan.tif' is not an image in an accepted format"),
    ],
    ids=["zero-byte", "non-image", "pixel-bomb", "too-wide", "too-many-pixels", "too-many-bytes", "tiff"],
)
def test_load_image_refusals(tmp_path, make, message):
    with pytest.raises(InputError, match=message) as info:
        load_image(make(tmp_path), "query image", LIMITS, [tmp_path])
    assert str(info.value).startswith("query image: ")


def test_load_image_truncated(tmp_path):
    good = save_image(tmp_path / "full.png", size=(64, 64), fmt="PNG")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"'cut.png' \(PNG, 64x64\) is truncated or corrupt"):
        load_image(cut, "context image 1", LIMITS, [tmp_path])


def test_paths_outside_the_upload_root_are_refused(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    outside = save_image(tmp_path / "secret.png", fmt="PNG")
    with pytest.raises(InputError, match="outside the upload folder"):
        load_image(root / ".." / "secret.png", "query image", LIMITS, [root])
    (root / "link.png").symlink_to(outside)
    with pytest.raises(InputError, match="outside the upload folder"):
        load_image(root / "link.png", "query image", LIMITS, [root])
    with pytest.raises(InputError, match="outside the upload folder"):
        load_image("/etc/passwd", "query image", LIMITS, [root])
    (root / "folder.png").mkdir()
    with pytest.raises(InputError, match="is not a file"):
        load_image(root / "folder.png", "query image", LIMITS, [root])


def test_field_checks():
    assert check_int(3.0, "seed", 0, 9) == 3
    with pytest.raises(InputError, match=r"seed: expected a whole number in \[0, 9\], got 2.5"):
        check_int(2.5, "seed", 0, 9)
    with pytest.raises(InputError, match=r"sampling steps: expected a whole number in \[1, 50\], got 0"):
        check_int(0, "sampling steps", 1, 50)
    with pytest.raises(InputError, match=r"guidance scale: expected a number in \[0.0, 10.0\], got nan"):
        check_number(float("nan"), "guidance scale", 0.0, 10.0)
    with pytest.raises(InputError, match="prompt: expected some text, got an empty field"):
        check_text("   ", "prompt", 10)
    with pytest.raises(InputError, match="prompt: expected at most 10 characters, got 11"):
        check_text("x" * 11, "prompt", 10)
    with pytest.raises(InputError, match=r"expected an even number of images .* got 3"):
        pair_up([None] * 3, "context pairs", 4)
    with pytest.raises(InputError, match=r"at most 1 pairs \(2 images\), got 4"):
        pair_up([None] * 4, "context pairs", 1)
    assert check_choice("b", "time grid", ("a", "b")) == "b"
    with pytest.raises(InputError, match=r"time grid: expected one of a, b, got None"):
        check_choice(None, "time grid", ("a", "b"))


def test_fit_square_keeps_the_centre():
    image = PIL.Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (30, 0, 60, 30))  # white centre third
    square = fit_square(image, 16)
    assert square.size == (16, 16) and np.asarray(square).min() > 200


# ------------------------------------------------------------------------------------------------------------------
# checkpoint discovery and loading


def test_missing_checkpoint_messages(tmp_path):
    slot = load_slot(None, "lavin_dit")
    assert not slot.ready and "No LaVin-DiT checkpoint given" in slot.message
    assert "accelerate launch train/lavin_dit.py" in slot.message
    with pytest.raises(CheckpointLoadError, match="No LaVin-DiT checkpoint given"):
        slot.require()
    slot = load_slot(tmp_path / "nope", "mvdit")
    assert f"{tmp_path / 'nope'} does not exist" in slot.message and "accelerate launch train/mvdit.py" in slot.message
    with pytest.raises(CheckpointLoadError, match=r"is not a run folder \(no checkpoints/\)"):
        resolve_pipeline_dir(tmp_path, "lavin_dit")


def _copy_export(source: Path, target: Path) -> Path:
    for item in source.rglob("*"):
        if item.is_file():
            (target / item.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / item.relative_to(source)).write_bytes(item.read_bytes())
    return target


def test_both_class_name_layouts_load(tmp_path, lavin_dir):
    """genvis writes diffusers' ``["pipeline_lavin_dit", "LaVinDiTPipeline"]``; folders written before the switch
    (a bare ``"LaVinDiTPipeline"``) still load; anything else is refused by name."""
    index = json.loads((lavin_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_lavin_dit", "LaVinDiTPipeline"]
    legacy = _copy_export(lavin_dir, tmp_path / "legacy")
    (legacy / "model_index.json").write_text(json.dumps({**index, "_class_name": "LaVinDiTPipeline"}))
    pipe, folder = load_family(legacy, "lavin_dit")
    assert isinstance(pipe, LaVinDiTPipeline) and folder == legacy
    with pytest.raises(CheckpointLoadError, match="holds a LaVinDiTPipeline, expected a MVDiTPipeline"):
        load_family(legacy, "mvdit")
    odd = _copy_export(lavin_dir, tmp_path / "odd")
    (odd / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline_lavin_dit"]}))
    with pytest.raises(CheckpointLoadError, match="holds a pipeline of unknown class, expected a LaVinDiTPipeline"):
        load_family(odd, "lavin_dit")


def test_wrong_family_and_damaged_weights(tmp_path, lavin_dir):
    with pytest.raises(CheckpointLoadError, match="holds a LaVinDiTPipeline, expected a MVDiTPipeline"):
        load_family(lavin_dir, "mvdit")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in lavin_dir.iterdir():
        target = damaged / item.name
        if item.is_dir():
            target.mkdir()
            for file in item.iterdir():
                (target / file.name).write_bytes(file.read_bytes())
        else:
            target.write_bytes(item.read_bytes())
    weights = next((damaged / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    slot = load_slot(damaged, "lavin_dit")
    assert not slot.ready and "could not be loaded as a LaVinDiTPipeline (incompatible or damaged" in slot.message


def test_run_folder_resolves_to_newest_complete_checkpoint(tmp_path, lavin_dir):
    from accelerate import Accelerator

    from genvis.training import CheckpointManager

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1)], lr=0.1))
    del model, optimizer
    run = tmp_path / "run"
    manager = CheckpointManager(accelerator, run / "checkpoints", total_limit=None)
    pipe = LaVinDiTPipeline.from_pretrained(lavin_dir)

    def export(folder: Path) -> None:
        pipe.save_pretrained(folder / "pipeline")

    manager.state.step = 2
    first = manager.save(export_fn=export)
    manager.state.step = 4
    second = manager.save(export_fn=export)
    assert resolve_pipeline_dir(run, "lavin_dit") == second / "pipeline"
    assert resolve_pipeline_dir(first, "lavin_dit") == first / "pipeline"

    # a corrupt newest checkpoint is skipped for the run folder and named when asked for directly
    weights = next((second / "pipeline" / "transformer").glob("*.safetensors"))
    weights.write_bytes(b"x" + weights.read_bytes()[1:])
    assert resolve_pipeline_dir(run, "lavin_dit") == first / "pipeline"
    with pytest.raises(CheckpointLoadError, match=r"is incomplete or corrupt: .*sha256 mismatch"):
        resolve_pipeline_dir(second, "lavin_dit")

    # a complete checkpoint with no export (not written by the training script) says how to make one
    manager.state.step = 6
    bare = manager.save()
    with pytest.raises(
        CheckpointLoadError, match=r"holds no export \(no \*/model_index.json\).*accelerate launch train/lavin_dit\.py"
    ):
        resolve_pipeline_dir(bare, "lavin_dit")
    loaded = load_slot(run, "lavin_dit")
    assert loaded.ready and loaded.folder == first / "pipeline" and "loaded" in loaded.message
    marker = json.loads((first / "COMPLETE.json").read_text())
    assert marker["step"] == 2


# ------------------------------------------------------------------------------------------------------------------
# LaVin-DiT handlers


def panel_colour(image: PIL.Image.Image, column: int, row: int = 0) -> tuple[int, ...]:
    """Colour at the centre of panel ``column`` (``row`` for stacked clips) of a :func:`labelled_row` image."""
    side = upscale(PIL.Image.new("RGB", (SIZE, SIZE))).size[0]
    x = column * (side + 12) + side // 2
    y = row * (side + 30 + 12) + 30 + side // 2
    return image.getpixel((x, y))


def test_upscale_and_labelled_row():
    small = PIL.Image.new("RGB", (32, 32), (10, 20, 30))
    big = upscale(small)
    assert big.size == (256, 256) and big.getpixel((255, 255)) == (10, 20, 30)
    assert upscale(PIL.Image.new("RGB", (160, 32))).size == (1280, 256)  # a 5-frame strip: whole factor 8
    assert upscale(PIL.Image.new("RGB", (300, 400))).size == (300, 400)  # already large: unchanged
    assert upscale(PIL.Image.new("RGB", (100, 100))).size == (300, 300)  # ceil(256 / 100) = 3
    red, blue = PIL.Image.new("RGB", (32, 32), (255, 0, 0)), PIL.Image.new("RGB", (32, 32), (0, 0, 255))
    row = labelled_row([(red, "query"), (blue, "prediction")])
    assert row.size == (2 * 256 + 12, 256 + 30)
    assert panel_colour(row, 0) == (255, 0, 0) and panel_colour(row, 1) == (0, 0, 255)
    caption = np.asarray(row.crop((0, 0, 256, 30)))
    assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on white
    strips = labelled_row([(PIL.Image.new("RGB", (96, 32)), "query"), (PIL.Image.new("RGB", (96, 32)), "prediction")])
    assert strips.size == (768, 2 * (256 + 30) + 12)  # clips stack top to bottom


def test_builtin_image_task(lavin):
    result = run_builtin_task(lavin, "colorization", 2, 0, "lavin-20", None, 1.5, SIZE)
    assert result.prediction.size == (SIZE, SIZE)  # the model's own resolution
    assert result.comparison.size == (3 * DISPLAY_SIDE + 2 * 12, DISPLAY_SIDE + 30)  # query | prediction | answer
    assert [caption for _, caption in result.gallery] == [
        "input 1", "target 1", "input 2", "target 2", "query", "prediction", "exact answer",
    ]  # fmt: skip
    assert all(image.size == (DISPLAY_SIDE, DISPLAY_SIDE) for image, _ in result.gallery)
    shown = {caption: image for image, caption in result.gallery}
    expected = shown["prediction"].resize((SIZE, SIZE), PIL.Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(expected), np.asarray(result.prediction))  # nearest-neighbour, no blur
    assert panel_colour(result.comparison, 1) == shown["prediction"].getpixel((DISPLAY_SIDE // 2, DISPLAY_SIDE // 2))
    assert panel_colour(result.comparison, 0) == shown["query"].getpixel((DISPLAY_SIDE // 2, DISPLAY_SIDE // 2))
    assert result.message.startswith(
        "colorization: 2 context pair(s), 1 frame(s), lavin-20 grid, 19 steps, guidance 1.5"
    )
    again = run_builtin_task(lavin, "colorization", 2, 0, "lavin-20", None, 1.5, SIZE)
    assert np.array_equal(np.asarray(again.prediction), np.asarray(result.prediction))  # seeded
    uniform = run_builtin_task(lavin, "colorization", 2, 0, "uniform", 2, 1.0, SIZE)
    assert "uniform grid, 2 steps, no guidance" in uniform.message


def test_builtin_video_task_is_a_filmstrip(lavin):
    result = run_builtin_task(lavin, "frame_prediction", 1, 0, "uniform", 1, 1.0, SIZE)
    assert result.prediction.size == (5 * SIZE, SIZE)  # 5 frames side by side
    assert result.comparison.size == (5 * DISPLAY_SIDE, 3 * (DISPLAY_SIDE + 30) + 2 * 12)  # strips stacked


@pytest.fixture
def recorded_calls(monkeypatch):
    """Every keyword set the handlers pass to ``LaVinDiTPipeline.__call__`` (the real call still runs)."""
    calls = []
    original = LaVinDiTPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LaVinDiTPipeline, "__call__", recording)
    return calls


def test_default_sampling_is_the_official_grid(lavin, recorded_calls, tmp_path):
    defaults = sampling_defaults(None)  # what the tab starts with when the run says nothing
    assert (defaults.time_grid, defaults.guidance) == ("lavin-20", 1.5)
    run_builtin_task(lavin, "colorization", 1, 0, defaults.time_grid, defaults.steps, defaults.guidance, SIZE)
    files = [save_image(tmp_path / "in.png"), save_image(tmp_path / "out.png", color=(0, 0, 250))]
    query = save_image(tmp_path / "query.png")
    run_uploaded_task(
        lavin, files, query, defaults.time_grid, defaults.steps, defaults.guidance, 0, SIZE, LIMITS, [tmp_path]
    )
    for kwargs in recorded_calls:
        assert kwargs["time_grid"] == "lavin-20" and "num_inference_steps" not in kwargs and "sigmas" not in kwargs
        assert kwargs["guidance_scale"] == 1.5
    run_builtin_task(lavin, "colorization", 1, 0, "lavin-40", 999, 1.0, SIZE)  # steps are ignored off uniform
    run_builtin_task(lavin, "colorization", 1, 0, "uniform", 3, 1.0, SIZE)
    assert recorded_calls[-2]["time_grid"] == "lavin-40" and "num_inference_steps" not in recorded_calls[-2]
    assert recorded_calls[-1]["num_inference_steps"] == 3 and "time_grid" not in recorded_calls[-1]
    assert len(recorded_calls) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "teleportation"}, r"task: expected one of colorization, .*got 'teleportation'"),
        ({"num_pairs": 9}, r"context pairs: expected a whole number in \[1, 4\], got 9"),
        (
            {"time_grid": "lavin-25"},
            r"time grid: expected one of lavin-20, lavin-30, lavin-40, uniform, got 'lavin-25'",
        ),
        ({"time_grid": None}, r"time grid: expected one of lavin-20, .*, got None"),
        ({"time_grid": "uniform", "steps": 500}, r"sampling steps: expected a whole number in \[1, 50\], got 500"),
        ({"time_grid": "uniform", "steps": 0}, r"sampling steps: expected a whole number in \[1, 50\], got 0"),
        ({"time_grid": "uniform", "steps": None}, r"sampling steps: expected a whole number in \[1, 50\], got None"),
        ({"guidance": -1}, r"guidance scale: expected a number in \[0.0, 10.0\], got -1"),
        ({"seed": -3}, r"seed: expected a whole number in \[0, 2147483647\], got -3"),
        ({"tasks": ["edge_detection"]}, r"task: expected one of edge_detection, got 'colorization'"),
    ],
)
def test_builtin_task_refusals(lavin, kwargs, message):
    args = {"task": "colorization", "num_pairs": 1, "seed": 0, "time_grid": "lavin-20", "steps": 1, "guidance": 1.0}
    with pytest.raises(InputError, match=message):
        run_builtin_task(lavin, size=SIZE, **{**args, **kwargs})


def test_uploaded_task_and_bad_uploads(lavin, tmp_path):
    colours = {"in": (9, 9, 9), "out": (250, 0, 0), "query": (200, 30, 30)}
    files = [save_image(tmp_path / f"{name}.png", color=colours[name]) for name in ("in", "out")]
    query = save_image(tmp_path / "query.jpg", size=(64, 48), color=colours["query"])
    result = run_uploaded_task(lavin, files, query, "uniform", 2, 1.5, 0, SIZE, LIMITS, [tmp_path])
    assert result.prediction.size == (SIZE, SIZE)
    assert [caption for _, caption in result.gallery] == ["input 1", "target 1", "query", "prediction"]
    assert all(image.size == (DISPLAY_SIDE, DISPLAY_SIDE) for image, _ in result.gallery)
    centre = (DISPLAY_SIDE // 2, DISPLAY_SIDE // 2)
    for (image, _), name in zip(result.gallery[:2], ("in", "out"), strict=True):
        assert image.getpixel(centre) == colours[name]  # the uploads themselves are shown
    assert result.comparison.size == (2 * DISPLAY_SIDE + 12, DISPLAY_SIDE + 30)  # query | prediction
    assert np.abs(np.subtract(panel_colour(result.comparison, 0), colours["query"])).max() <= 8  # a JPEG query
    assert result.message.startswith("uploaded task: 1 context pair(s), uniform grid, 2 steps, guidance 1.5")

    def refused(context, query_file, message):
        with pytest.raises(InputError, match=message):
            run_uploaded_task(lavin, context, query_file, "lavin-20", None, 1.5, 0, SIZE, LIMITS, [tmp_path])

    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    refused(files, tmp_path / "zero.png", r"query image: 'zero.png' is empty \(0 bytes\)")
    refused(files, tmp_path / "text.png", r"query image: 'text.png' is not an image")
    refused(files, huge_png(tmp_path / "bomb.png", 20000, 20000), r"query image: 'bomb.png' is 400.0 MP; the limit is")
    refused([files[0], tmp_path / "text.png"], query, r"context image 2: 'text.png' is not an image")
    refused(files[:1], query, "context pairs: expected an even number of images")
    refused([], query, "context pairs: expected at least one")
    refused(files, None, "query image: expected an uploaded image, got nothing")
    with pytest.raises(InputError, match="time grid: expected one of"):
        run_uploaded_task(lavin, files, query, "fast", 2, 1.5, 0, SIZE, LIMITS, [tmp_path])
    # after all that the handler still serves a good request
    again = run_uploaded_task(lavin, files, query, "lavin-20", None, 1.0, 1, SIZE, LIMITS, [tmp_path])
    assert again.prediction.size == (SIZE, SIZE)


def test_upload_preview_shows_uploads_and_refusals(tmp_path):
    files = [save_image(tmp_path / "a.png", color=(0, 200, 0)), save_image(tmp_path / "b.png", color=(0, 0, 200))]
    (tmp_path / "text.png").write_text("not an image")
    items, summary = preview_uploads([*files, files[0]], files[1], SIZE, LIMITS, [tmp_path])
    assert [caption for _, caption in items] == ["input 1", "target 1", "input 2", "query"]
    assert items[0][0].size == (DISPLAY_SIDE, DISPLAY_SIDE) and items[0][0].getpixel((5, 5)) == (0, 200, 0)
    assert summary.startswith("preview: 1 context pair(s) and an input without its target, a query")
    items, summary = preview_uploads(files, tmp_path / "text.png", SIZE, LIMITS, [tmp_path])
    assert [caption for _, caption in items] == ["input 1", "target 1"]
    assert "refused: query image: 'text.png' is not an image" in summary
    items, summary = preview_uploads(None, None, SIZE, LIMITS, [tmp_path])
    assert items == [] and summary == "preview: 0 context pair(s), no query yet, shown at 32 px as the model sees them"


# ------------------------------------------------------------------------------------------------------------------
# what the LaVin-DiT tab offers: the run's trained tasks and sampling defaults


def test_trained_tasks_come_from_the_run_config():
    from genvis.tasks import list_tasks

    listed = trained_tasks({"data": {"tasks": ["edge_detection", "inpainting"], "kinds": ["image"]}})
    assert listed.names == ["edge_detection", "inpainting"] and listed.from_config
    assert "`data.tasks`" in listed.note
    by_kind = trained_tasks({"data": {"tasks": None, "kinds": ["video"]}})
    assert by_kind.names == list_tasks("video") and "`data.kinds` = video" in by_kind.note
    assert trained_tasks({"data": {"tasks": [], "kinds": ["image", "video"]}}).names == list_tasks()  # as training
    renamed = trained_tasks({"data": {"tasks": ["colorization", "old_task"]}})
    assert renamed.names == ["colorization"] and "left out: old_task" in renamed.note
    for config in (None, {}, {"data": "broken"}, {"data": {"tasks": ["old_task"]}}):
        fallback = trained_tasks(config)
        assert fallback.names == list_tasks("image") and not fallback.from_config
        assert "listing every built-in image task" in fallback.note


def test_sampling_defaults_come_from_the_run_config():
    run = sampling_defaults({"sampling": {"time_grid": "lavin-30", "guidance_scale": 2.5}})
    assert (run.time_grid, run.steps, run.guidance) == ("lavin-30", 10, 2.5)
    uniform = sampling_defaults({"sampling": {"time_grid": None, "num_inference_steps": 8, "guidance_scale": 1}})
    assert (uniform.time_grid, uniform.steps, uniform.guidance) == ("uniform", 8, 1.0)
    assert "from the run's `sampling` config" in uniform.note
    for config in (None, {"sampling": {"time_grid": "euler-7", "guidance_scale": 99}}, {"sampling": None}):
        defaults = sampling_defaults(config, steps=4)
        assert (defaults.time_grid, defaults.steps, defaults.guidance) == ("lavin-20", 4, 1.5)
        assert "the official `lavin-20` grid" in defaults.note


def test_training_config_of_run_and_checkpoint_exports(tmp_path, lavin_dir):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    config = {"output_dir": str(run), "data": {"tasks": ["denoising"], "size": 32}, "sampling": {}}
    (run / "config.json").write_text(json.dumps(config))
    assert training_config(run / "pipeline") == config
    (run / "config.json").write_text(json.dumps({"_class_name": "SomethingElse"}))  # not a training config
    assert training_config(run / "pipeline") is None
    checkpoint = tmp_path / "checkpoint-00000004"
    (checkpoint / "pipeline").mkdir(parents=True)
    (checkpoint / "COMPLETE.json").write_text(json.dumps({"step": 4, "config": config}))
    assert training_config(checkpoint / "pipeline") == config
    assert training_config(lavin_dir) is None  # an export with nothing around it


# ------------------------------------------------------------------------------------------------------------------
# MVDiT handler


@pytest.fixture(scope="module")
def mvdit(tmp_path_factory):
    from genvis.diffusion.text_to_video import TextToVideoObjective
    from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
    from genvis.pipelines.pipeline_mvdit import MVDiTPipeline, build_image_vae
    from genvis.text import load_text_encoder, text_embed_dim

    torch.manual_seed(0)
    tokenizer, encoder = load_text_encoder("tiny-t5")
    vae = build_image_vae("tiny")
    config = {
        **MVDIT_PRESETS["tiny"],
        "in_channels": vae.config.latent_channels,
        "text_embed_dim": text_embed_dim(encoder),
        "max_text_length": 24,
    }
    transformer = MVDiTTransformer3DModel(**config)
    pipe = MVDiTPipeline(tokenizer, encoder, transformer, vae, TextToVideoObjective("ddpm").make_scheduler())
    folder = tmp_path_factory.mktemp("mvdit") / "pipeline"
    pipe.save_pretrained(folder)
    loaded, _ = load_family(folder, "mvdit")
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_text_to_video(mvdit, tmp_path):
    from genvis.data.video import read_frames

    result = run_text_to_video(mvdit, "a red circle moves left", 3, 2, 4.0, 0, tmp_path / "out")
    assert result.video_path.parent == tmp_path / "out" and result.video_path.suffix == ".mp4"
    frames = read_frames(result.video_path)
    assert len(frames) == 3
    assert result.preview.size[0] == 3 * result.preview.size[1]
    assert result.message.startswith("3 frames at")
    with pytest.raises(InputError, match="prompt: expected some text"):
        run_text_to_video(mvdit, "", 3, 2, 4.0, 0, tmp_path)
    with pytest.raises(InputError, match=r"frames: expected a whole number in \[1, 33\], got 0"):
        run_text_to_video(mvdit, "a cat", 0, 2, 4.0, 0, tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# MLLM chat and encoder inspection


def test_mllm_chat(tmp_path):
    from genvis.models.vision_tower import VisionLanguageModel

    torch.manual_seed(0)
    VisionLanguageModel.from_configs().save_pretrained(tmp_path / "run" / "model")
    slot = load_slot(tmp_path / "run", "mllm")
    assert slot.ready, slot.message
    image = save_image(tmp_path / "shape.png", size=(40, 40))
    answer = run_chat(slot.pipeline, image, "What colour is the shape?", LIMITS, [tmp_path], 4, 32)
    assert isinstance(answer, str) and answer
    with pytest.raises(InputError, match="question: expected some text"):
        run_chat(slot.pipeline, image, " ", LIMITS, [tmp_path])
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"image: 'zero.png' is empty \(0 bytes\)"):
        run_chat(slot.pipeline, tmp_path / "zero.png", "How many shapes?", LIMITS, [tmp_path])
    assert "accelerate launch train/mllm.py" in load_slot(None, "mllm").message


def test_encoder_inspection(tmp_path):
    from genvis.encoders import VISION_TRANSFORMER_PRESETS, VisionTransformerModel

    encoder = VisionTransformerModel(**VISION_TRANSFORMER_PRESETS["tiny"])
    encoder.save_pretrained(tmp_path / "encoder")
    loaded, label = load_encoder(tmp_path / "encoder")
    assert label == "encoder (2 registers)"
    image = tmp_path / "scene.png"
    array = np.zeros((48, 64, 3), dtype=np.uint8)
    array[10:30, 20:50] = (255, 0, 0)
    PIL.Image.fromarray(array).save(image)
    items, summary = run_encoder_inspection([(label, loaded)], image, 64, LIMITS, [tmp_path])
    assert [caption for _, caption in items] == [f"{label}: PCA", f"{label}: patch norms"]
    assert items[0][0].size == (64, 64) and len(np.unique(np.asarray(items[0][0]).reshape(-1, 3), axis=0)) > 1
    assert "2 register(s), 8x8 patches" in summary
    with pytest.raises(CheckpointLoadError, match="is not a VisionTransformerModel save_pretrained folder"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(InputError, match=r"input size: expected a whole number in \[32, 512\], got 7"):
        run_encoder_inspection([(label, loaded)], image, 7, LIMITS, [tmp_path])
