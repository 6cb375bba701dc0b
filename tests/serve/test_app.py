"""serve/app.py's LaVin-DiT tab, built (not launched) from a run's training config.

Checks what the tab offers before anyone clicks: only the run's trained tasks in the dropdown and the examples, the
run's sampling defaults (else the official lavin-20 grid), and that the wired button passes the time grid, not a step
count, to the pipeline.
"""

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import PIL.Image
import pytest

from serve.app import ServeConfig, build_demo, builtin_examples, time_grid_choices
from serve.loading import FAMILIES, ModelSlot


class RecordingPipeline:
    """Stands in for a LaVinDiTPipeline: records each call's keywords and answers a grey image."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, context_pairs, query, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(frames=[PIL.Image.new("RGB", (kwargs["width"], kwargs["height"]), (128, 128, 128))])


def build(tmp_path: Path, train_config: dict | None, pipeline=None):
    slot = ModelSlot(FAMILIES["lavin_dit"], pipeline=pipeline, message="LaVin-DiT: test", train_config=train_config)
    config = ServeConfig(
        lavin=slot,
        mvdit=ModelSlot(FAMILIES["mvdit"], message="no MVDiT"),
        mllm=ModelSlot(FAMILIES["mllm"], message="no MLLM"),
        encoders=[],
        encoder_message="no encoders",
        cache_dir=tmp_path / "cache",
        size=32,
    )
    demo = build_demo(config)
    components = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    datasets = [block.samples for block in demo.blocks.values() if isinstance(block, gr.Dataset)]
    return demo, components, datasets


def test_tab_offers_the_trained_tasks_and_the_run_defaults(tmp_path):
    config = {
        "output_dir": "runs/lavin_dit",
        "data": {"tasks": ["edge_detection", "inpainting", "frame_prediction"], "kinds": ["image"], "size": 32},
        "sampling": {"time_grid": "lavin-30", "num_inference_steps": None, "guidance_scale": 2.0},
    }
    _, components, datasets = build(tmp_path, config)
    task = components["lavin-task"]
    assert [value for _, value in task.choices] == ["edge_detection", "inpainting", "frame_prediction"]
    assert task.value == "edge_detection"
    builtin = datasets[0]
    assert builtin == [["edge_detection", 2, 0], ["inpainting", 2, 1], ["frame_prediction", 1, 2]]
    assert datasets[1][0][1] == "edge_detection_query.png"  # upload examples from a trained image task
    assert components["lavin-time-grid"].value == "lavin-30" and components["lavin-guidance"].value == 2.0
    assert components["lavin-steps"].visible is False  # the step slider is for the uniform grid only
    note = components["lavin-defaults"].value
    assert "trained on (`data.tasks` of its training config)" in note and "`lavin-30`, guidance 2" in note


def test_without_a_config_the_tab_uses_the_official_grid_and_says_so(tmp_path):
    from genvis.tasks import list_tasks

    pipe = RecordingPipeline()
    demo, components, datasets = build(tmp_path, None, pipe)
    assert [value for _, value in components["lavin-task"].choices] == list_tasks("image")
    assert all(name in list_tasks("image") for name, _, _ in datasets[0]) and len(datasets[0]) == 4
    assert "carries no training config" in components["lavin-defaults"].value
    assert components["lavin-time-grid"].value == "lavin-20"
    assert [value for _, value in time_grid_choices()] == ["lavin-20", "lavin-30", "lavin-40", "uniform"]
    assert time_grid_choices()[0][0] == "lavin-20 (official default, 19 steps)"

    # the Run button with the tab's defaults: the official grid by name, never a step count
    (function,) = [fn for fn in demo.fns.values() if fn.api_name == "lavin_builtin"]
    defaults = [components[name].value for name in ("lavin-time-grid", "lavin-steps", "lavin-guidance", "lavin-seed")]
    comparison, gallery, message = function.fn("colorization", 1, *defaults)
    assert pipe.calls[-1]["time_grid"] == "lavin-20" and "num_inference_steps" not in pipe.calls[-1]
    assert comparison.size[1] >= 256 and [caption for _, caption in gallery][-2:] == ["prediction", "exact answer"]
    assert "lavin-20 grid, 19 steps" in message
    with pytest.raises(gr.Error, match="time grid: expected one of"):
        function.fn("colorization", 1, "lavin-19", *defaults[1:])
    with pytest.raises(gr.Error, match="task: expected one of colorization"):
        function.fn("frame_prediction", 1, *defaults)  # not a task of the (fallback) image list


def test_builtin_examples_spread_over_many_tasks():
    from genvis.tasks import list_tasks

    rows = builtin_examples(list_tasks())
    assert len(rows) == 4 and len({name for name, _, _ in rows}) == 4
    assert builtin_examples(["denoising"]) == [["denoising", 2, 0]]
