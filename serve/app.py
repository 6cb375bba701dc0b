"""genvis Gradio demo: LaVin-DiT in-context tasks, MVDiT text-to-video, encoder inspection, MLLM chat.

    python serve/app.py --checkpoint runs/lavin_dit [--mvdit-checkpoint runs/mvdit] [--host 127.0.0.1 --port 7860]

This file only wires the UI: what each button does lives in ``serve/handlers.py``, input checks in
``serve/validation.py`` and checkpoint discovery in ``serve/loading.py`` (README "Gradio demo"). Safety settings follow
specs/perf_reliability_ecosystem.md §B6: loopback bind and no share link by default, analytics off, a bounded queue,
an upload size limit, a private cache folder as the only upload root, checkpoints in ``blocked_paths``, no URL inputs,
errors shown as messages (``gr.Error``) so the server keeps serving. Browser test: tests/serve/test_e2e_browser.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ``python serve/app.py`` puts serve/ (not the repository) on sys.path; the app imports ``serve.*`` modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics / version-check traffic
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve.handlers import (
    MAX_NEW_TOKENS,
    MAX_PAIRS,
    MAX_STEPS,
    TIME_GRIDS,
    UNIFORM_GRID,
    SamplingDefaults,
    TrainedTasks,
    preview_uploads,
    run_builtin_task,
    run_chat,
    run_encoder_inspection,
    run_text_to_video,
    run_uploaded_task,
    sampling_defaults,
    trained_tasks,
)
from serve.loading import CheckpointLoadError, ModelSlot, load_encoder, load_slot
from serve.validation import InputError, UploadLimits

logger = logging.getLogger("genvis.serve")

QUEUE_SIZE = 16  # requests waiting at most; more are refused by Gradio with a "queue is full" message
MAX_BUILTIN_EXAMPLES = 4  # example rows of the built-in task section, spread over the run's trained tasks
PROMPT_EXAMPLES = [
    ["a red circle moves from left to right over a black background"],
    ["a green square falls from top to bottom"],
]


@dataclass
class ServeConfig:
    """Everything the UI needs, resolved from the command line.

    Args:
        lavin: LaVin-DiT pipeline slot.
        mvdit: MVDiT pipeline slot.
        mllm: MLLM (vision tower + LM) slot.
        encoders: ``(label, VisionTransformerModel)`` shown by the encoder tab.
        encoder_message: where the encoders came from (or why some did not load).
        cache_dir: private folder for Gradio's uploads and our outputs (the only upload root).
        size: LaVin-DiT working resolution (square).
        size_source: where ``size`` came from (shown on the tab).
        steps: default sampling steps (MVDiT, and LaVin-DiT's uniform grid).
        limits: upload limits.
        blocked: folders Gradio must never serve (checkpoints).
    """

    lavin: ModelSlot
    mvdit: ModelSlot
    mllm: ModelSlot
    encoders: list[tuple[str, Any]]
    encoder_message: str
    cache_dir: Path
    size: int = 64
    size_source: str = "the demo's default"
    steps: int = 10
    limits: UploadLimits = field(default_factory=UploadLimits)
    blocked: list[str] = field(default_factory=list)

    @property
    def lavin_tasks(self) -> TrainedTasks:
        """The built-in tasks the LaVin-DiT tab offers: the loaded run's trained tasks."""
        return trained_tasks(self.lavin.train_config)

    @property
    def lavin_sampling(self) -> SamplingDefaults:
        """The LaVin-DiT tab's sampling defaults: the run's `sampling` config, else the official lavin-20 grid."""
        return sampling_defaults(self.lavin.train_config, self.steps)

    @property
    def output_dir(self) -> Path:
        return self.cache_dir / "outputs"

    @property
    def examples_dir(self) -> Path:
        return self.cache_dir / "examples"


def _serve(gr, slot: ModelSlot | None, handler: Callable[..., Any], *args: Any) -> Any:
    """Run ``handler(model, *args)`` (or ``handler(*args)`` without a slot) for one request.

    Refused input and a missing model become the UI message (and a log line); any other failure is logged with its
    traceback and shown as a short "internal error" message, so one bad request never stops the server.
    """
    try:
        return handler(slot.require(), *args) if slot is not None else handler(*args)
    except (InputError, CheckpointLoadError) as err:
        logger.warning(f"request refused: {err}")
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # any other failure: keep serving, keep the traceback in the log only
        logger.exception("request failed")
        raise gr.Error(
            f"Internal error ({type(err).__name__}); the request was dropped and the server log has the details.",
            print_exception=False,
        ) from None


def builtin_examples(tasks: list[str]) -> list[list[Any]]:
    """``[task, pairs, seed]`` rows spread over ``tasks`` (at most :data:`MAX_BUILTIN_EXAMPLES`); clips get one pair."""
    from genvis.tasks import get_task

    stride = max(1, len(tasks) // MAX_BUILTIN_EXAMPLES)
    picked = tasks[::stride][:MAX_BUILTIN_EXAMPLES]
    return [[name, 2 if get_task(name).kind == "image" else 1, seed] for seed, name in enumerate(picked)]


def upload_example_task(tasks: list[str]) -> str:
    """The task the upload examples are drawn from: colorization when trained, else the first trained image task."""
    from genvis.tasks import get_task

    images = [name for name in tasks if get_task(name).kind == "image"]
    return "colorization" if "colorization" in images or not images else images[0]


def _write_upload_examples(config: ServeConfig, name: str) -> list[list[Any]]:
    """Two pairs + a query of the built-in task ``name`` as PNG files -> ``[[context files, query file]]``.

    The upload section draws them from a trained task (:func:`upload_example_task`); the encoder and MLLM tabs show
    the colorization query whatever the LaVin-DiT run trained on.
    """
    from genvis.tasks import get_task, sample_episode
    from serve.handlers import _clip_frames as clip_frames
    from serve.handlers import filmstrip

    config.examples_dir.mkdir(parents=True, exist_ok=True)
    episode = sample_episode(get_task(name), 2, seed=7, size=config.size, split="test")
    context = []
    for index, (source, target) in enumerate(episode.context_pairs, start=1):
        for role, clip in (("input", source), ("target", target)):
            path = config.examples_dir / f"{name}_{role}_{index}.png"
            filmstrip(clip_frames(clip)).save(path)
            context.append(str(path))
    query = config.examples_dir / f"{name}_query.png"
    filmstrip(clip_frames(episode.query)).save(query)
    return [[context, str(query)]]


def time_grid_choices() -> list[tuple[str, str]]:
    """``(label, value)`` for the time-grid dropdown: the official grids with their Euler steps, then uniform."""
    from genvis.diffusion import DEFAULT_TIME_GRID, LAVIN_DIT_TIME_GRIDS

    labels = []
    for name in TIME_GRIDS:
        if name == UNIFORM_GRID:
            labels.append(("uniform (set the steps)", name))
        else:
            kind = "official default" if name == DEFAULT_TIME_GRID else "official"
            labels.append((f"{name} ({kind}, {len(LAVIN_DIT_TIME_GRIDS[name]) - 1} steps)", name))
    return labels


def build_demo(config: ServeConfig):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    roots = [config.cache_dir]
    track_progress = gr.Progress(track_tqdm=True)  # the pipelines' tqdm bars drive the UI progress bar
    tasks, sampling = config.lavin_tasks, config.lavin_sampling

    with gr.Blocks(title="genvis demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# genvis demo\nTiny CPU checkpoints give rough results; the point is the full path from a training run to a served model."
        )
        with gr.Tabs():
            # ---------------------------------------------------------------------------------------------------
            with gr.Tab("LaVin-DiT in-context", id="lavin"):
                gr.Markdown(config.lavin.message, elem_id="lavin-status")
                gr.Markdown(
                    f"{tasks.note} {sampling.note} Resolution {config.size} px ({config.size_source}).",
                    elem_id="lavin-defaults",
                )
                with gr.Row():
                    time_grid = gr.Dropdown(
                        time_grid_choices(), value=sampling.time_grid, label="Time grid", elem_id="lavin-time-grid"
                    )
                    steps = gr.Slider(
                        1, MAX_STEPS, value=sampling.steps, step=1, label="Sampling steps (uniform grid)",
                        visible=sampling.time_grid == UNIFORM_GRID, elem_id="lavin-steps",
                    )  # fmt: skip
                    guidance = gr.Slider(
                        0.0, 10.0, value=sampling.guidance, step=0.1, label="Guidance scale", elem_id="lavin-guidance"
                    )
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="lavin-seed")
                time_grid.change(
                    lambda grid: gr.update(visible=grid == UNIFORM_GRID), time_grid, steps, queue=False,
                    api_visibility="private",
                )  # fmt: skip
                with gr.Tabs():
                    with gr.Tab("Built-in task", id="lavin-builtin"):
                        default_task = "colorization" if "colorization" in tasks.names else tasks.names[0]
                        task = gr.Dropdown(tasks.names, value=default_task, label="Task", elem_id="lavin-task")
                        pairs = gr.Slider(1, MAX_PAIRS, value=2, step=1, label="Context pairs", elem_id="lavin-pairs")
                        run_builtin = gr.Button("Run task", variant="primary", elem_id="lavin-run-builtin")
                        gr.Examples(
                            builtin_examples(tasks.names),
                            inputs=[task, pairs, seed],
                            label="Examples (held-out episodes of the trained tasks)",
                        )
                    with gr.Tab("Upload your own", id="lavin-upload"):
                        gr.Markdown(
                            f"Upload context images in order **input 1, target 1, input 2, target 2, ...** "
                            f"(at most {MAX_PAIRS} pairs) and a query image. PNG, JPEG, WEBP, BMP or GIF, at most "
                            f"{config.limits.max_bytes // 2**20} MiB and {config.limits.max_pixels / 1e6:.1f} MP each; "
                            f"images are centre-cropped to a square and resized to {config.size} px."
                        )
                        context_files = gr.File(file_count="multiple", label="Context pairs", elem_id="lavin-context")
                        query_file = gr.File(label="Query image", elem_id="lavin-query")
                        run_upload = gr.Button("Run on uploads", variant="primary", elem_id="lavin-run-upload")
                        try:
                            example_task = upload_example_task(tasks.names)
                            upload_examples = _write_upload_examples(config, example_task)
                            other_examples = (
                                upload_examples
                                if example_task == "colorization"
                                else _write_upload_examples(config, "colorization")
                            )
                        except (OSError, ValueError) as err:
                            logger.warning(f"upload examples unavailable: {err}")
                            upload_examples = other_examples = []
                        if upload_examples:
                            gr.Examples(
                                upload_examples,
                                inputs=[context_files, query_file],
                                label=f"Example uploads (a held-out {example_task} episode)",
                            )
                info = gr.Markdown(elem_id="lavin-info")
                output = gr.Image(
                    label="Query, prediction and exact answer (upscaled)",
                    type="pil",
                    format="png",
                    elem_id="lavin-output",
                    interactive=False,
                    show_label=False,  # the image carries its own captions; Gradio's label badge would cover one
                )
                gallery = gr.Gallery(
                    label="Context pairs, query and prediction (upscaled)",
                    columns=6,
                    height="auto",
                    object_fit="contain",
                    elem_id="lavin-gallery",
                )

            def on_builtin(
                task_name, num_pairs, grid, steps_value, guidance_value, seed_value, progress=track_progress
            ):
                result = _serve(
                    gr, config.lavin, run_builtin_task, task_name, num_pairs, seed_value, grid, steps_value,
                    guidance_value, config.size, tasks.names,
                )  # fmt: skip
                return result.comparison, result.gallery, result.message

            def on_upload(files, query, grid, steps_value, guidance_value, seed_value, progress=track_progress):
                result = _serve(
                    gr, config.lavin, run_uploaded_task, files, query, grid, steps_value, guidance_value, seed_value,
                    config.size, config.limits, roots,
                )  # fmt: skip
                return result.comparison, result.gallery, result.message

            def on_preview(files, query):
                items, summary = preview_uploads(files, query, config.size, config.limits, roots)
                return None, items, summary  # clear the last result: it belongs to other inputs

            run_builtin.click(
                on_builtin,
                [task, pairs, time_grid, steps, guidance, seed],
                [output, gallery, info],
                api_name="lavin_builtin",
            )
            run_upload.click(
                on_upload,
                [context_files, query_file, time_grid, steps, guidance, seed],
                [output, gallery, info],
                api_name="lavin_upload",
            )
            for upload in (context_files, query_file):
                upload.change(
                    on_preview, [context_files, query_file], [output, gallery, info], show_progress="hidden",
                    api_visibility="private", trigger_mode="always_last",
                )  # fmt: skip

            # ---------------------------------------------------------------------------------------------------
            with gr.Tab("MVDiT text-to-video", id="mvdit"):
                gr.Markdown(config.mvdit.message, elem_id="mvdit-status")
                default_frames = getattr(config.mvdit.pipeline, "default_num_frames", 16) if config.mvdit.ready else 16
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=500, elem_id="mvdit-prompt")
                with gr.Row():
                    frames = gr.Slider(1, 33, value=default_frames, step=1, label="Frames", elem_id="mvdit-frames")
                    video_steps = gr.Slider(
                        1, MAX_STEPS, value=config.steps, step=1, label="Sampling steps", elem_id="mvdit-steps"
                    )
                    video_guidance = gr.Slider(
                        0.0, 20.0, value=7.0, step=0.5, label="Guidance scale", elem_id="mvdit-guidance"
                    )
                    video_seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="mvdit-seed")
                run_video = gr.Button("Generate video", variant="primary", elem_id="mvdit-run")
                gr.Examples(PROMPT_EXAMPLES, inputs=[prompt], label="Example prompts")
                with gr.Row():
                    video = gr.Video(label="Video", elem_id="mvdit-video", interactive=False)
                    preview = gr.Image(
                        label="Frames", type="pil", format="png", elem_id="mvdit-preview", interactive=False
                    )
                video_info = gr.Markdown(elem_id="mvdit-info")

            def on_video(text, num_frames, steps_value, guidance_value, seed_value, progress=track_progress):
                result = _serve(
                    gr, config.mvdit, run_text_to_video, text, num_frames, steps_value, guidance_value, seed_value,
                    config.output_dir,
                )  # fmt: skip
                return str(result.video_path), result.preview, result.message

            run_video.click(
                on_video,
                [prompt, frames, video_steps, video_guidance, video_seed],
                [video, preview, video_info],
                api_name="mvdit_generate",
            )

            # ---------------------------------------------------------------------------------------------------
            with gr.Tab("Encoder inspection", id="encoders"):
                gr.Markdown(config.encoder_message, elem_id="encoder-status")
                with gr.Row():
                    encoder_image = gr.File(label="Image", elem_id="encoder-image")
                    encoder_size = gr.Slider(
                        32, 512, value=224, step=32, label="Input size (px)", elem_id="encoder-size"
                    )
                run_encoders = gr.Button("Inspect", variant="primary", elem_id="encoder-run")
                if other_examples:
                    gr.Examples([[other_examples[0][1], 128]], inputs=[encoder_image, encoder_size], label="Example")
                encoder_gallery = gr.Gallery(
                    label="Feature PCA and patch-norm maps", columns=4, elem_id="encoder-gallery"
                )
                encoder_info = gr.Markdown(elem_id="encoder-info")

            def on_encoders(image_file, size_value, progress=track_progress):
                return _serve(
                    gr, None, run_encoder_inspection, config.encoders, image_file, size_value, config.limits, roots
                )

            run_encoders.click(
                on_encoders, [encoder_image, encoder_size], [encoder_gallery, encoder_info], api_name="encoder_inspect"
            )

            # ---------------------------------------------------------------------------------------------------
            with gr.Tab("MLLM chat", id="mllm"):
                gr.Markdown(config.mllm.message, elem_id="mllm-status")
                with gr.Row():
                    chat_image = gr.File(label="Image", elem_id="mllm-image")
                    with gr.Column():
                        question = gr.Textbox(label="Question", max_length=300, elem_id="mllm-question")
                        answer_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=16, step=1, label="Answer tokens")
                        ask = gr.Button("Ask", variant="primary", elem_id="mllm-run")
                chat = gr.Chatbot(label="Conversation", elem_id="mllm-chat")
                if other_examples:
                    gr.Examples(
                        [
                            [other_examples[0][1], "What colour is the shape?"],
                            [other_examples[0][1], "How many shapes?"],
                        ],
                        inputs=[chat_image, question],
                        label="Examples (the questions the tiny preset trains on)",
                    )

            def on_ask(image_file, text, tokens, history, progress=track_progress):
                image_size = config.mllm.config_value("data", "image_size") or 32  # train/mllm.py's default resolution
                answer = _serve(gr, config.mllm, run_chat, image_file, text, config.limits, roots, tokens, image_size)
                return [*(history or []), {"role": "user", "content": text}, {"role": "assistant", "content": answer}]

            ask.click(on_ask, [chat_image, question, answer_tokens, chat], [chat], api_name="mllm_chat")
    return demo


def _encoders(paths: list[str], mllm: ModelSlot, device: str) -> tuple[list[tuple[str, Any]], str]:
    """Encoders for the inspection tab: ``--encoder-checkpoint`` folders, the MLLM's vision encoder, else two
    random-init tiny encoders (without / with registers) so the tab still shows what it does."""
    encoders, notes = [], []
    for path in paths:
        try:
            encoders.append(load_encoder(path, device))
        except CheckpointLoadError as err:
            logger.error(str(err))
            notes.append(str(err))
    if mllm.ready:
        encoders.append((f"MLLM vision encoder ({mllm.folder})", mllm.pipeline.vision_tower.encoder))
    if not encoders:
        from genvis.encoders import VISION_TRANSFORMER_PRESETS, VisionTransformerModel

        for registers in (0, 4):
            torch_seeded = VisionTransformerModel(
                **{**VISION_TRANSFORMER_PRESETS["tiny"], "num_register_tokens": registers}
            )
            encoders.append((f"random-init tiny, {registers} registers", torch_seeded.eval()))
        notes.append(
            "No encoder checkpoint given: showing random-init tiny encoders (maps show positional structure only). "
            "Pass `--encoder-checkpoint FOLDER` (a VisionTransformerModel save_pretrained folder, e.g. from "
            "`accelerate launch train/ph_reg.py`; repeat the flag to compare without / with registers) or "
            "`--mllm-checkpoint runs/mllm`."
        )
    header = "Encoders: " + ", ".join(f"**{label}**" for label, _ in encoders)
    return encoders, "\n\n".join([header, *notes])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="LaVin-DiT run folder, checkpoint-XXXXXXXX folder or exported pipeline")
    parser.add_argument("--mvdit-checkpoint", help="MVDiT run folder, checkpoint folder or exported pipeline")
    parser.add_argument("--mllm-checkpoint", help="MLLM run folder, checkpoint folder or exported model folder")
    parser.add_argument(
        "--encoder-checkpoint",
        action="append",
        default=[],
        help="VisionTransformerModel save_pretrained folder for the encoder tab (repeat to compare, e.g. without "
        "and with registers)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--size",
        type=int,
        help="LaVin-DiT working resolution (square; default: the checkpoint's training size, else 64)",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="default steps of the uniform grid (LaVin-DiT) and of MVDiT sampling"
    )
    parser.add_argument("--max-file-mb", type=int, default=20, help="largest upload in MiB")
    parser.add_argument("--max-megapixels", type=float, default=16.7, help="largest upload in megapixels")
    parser.add_argument("--cache-dir", help="private folder for uploads and outputs (default: a new temp folder)")
    parser.add_argument("--device", default="cpu", help="torch device for the models")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps: expected 1..{MAX_STEPS}, got {args.steps}")
    if args.size is not None and (args.size < 16 or args.size % 8):
        parser.error(f"--size: expected a multiple of 8 >= 16, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="genvis-serve-")).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache_dir)  # uploads land here and nowhere else
    limits = UploadLimits(max_bytes=args.max_file_mb * 2**20, max_pixels=int(args.max_megapixels * 1e6))
    checkpoints = (args.checkpoint, args.mvdit_checkpoint, args.mllm_checkpoint, *args.encoder_checkpoint)
    blocked = [str(Path(p).resolve()) for p in checkpoints if p]
    lavin = load_slot(args.checkpoint, "lavin_dit", device=args.device)
    mllm = load_slot(args.mllm_checkpoint, "mllm", device=args.device)
    encoders, encoder_message = _encoders(args.encoder_checkpoint, mllm, args.device)
    run_size = lavin.config_value("data", "size")
    config = ServeConfig(
        lavin=lavin,
        mvdit=load_slot(args.mvdit_checkpoint, "mvdit", device=args.device),
        mllm=mllm,
        encoders=encoders,
        encoder_message=encoder_message,
        cache_dir=cache_dir,
        size=args.size or run_size or 64,
        size_source="`--size`" if args.size else "the run's `data.size`" if run_size else "the demo's default",
        steps=args.steps,
        limits=limits,
        blocked=blocked,
    )
    demo = build_demo(config)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    logger.info(f"serving on http://{args.host}:{args.port} (uploads and outputs in {cache_dir})")
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=limits.max_bytes,
        allowed_paths=[str(config.examples_dir)],
        blocked_paths=[*blocked, str(Path.home() / ".cache"), ".env"],
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        footer_links=["api", "settings"],
    )


if __name__ == "__main__":
    main()
