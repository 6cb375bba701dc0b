"""Does what we train learn? Runs the default presets and prints every learning metric next to its baselines.

    python benchmarks/learning.py                          # train the default LaVin-DiT run, then score it
    python benchmarks/learning.py --lavin-run runs/lavin_dit  # score an existing run (its pipeline/ export)
    python benchmarks/learning.py --lavin-official            # also train + score tiny_official.yaml (the control)

LaVin-DiT, on held-out episodes (held-out sources, seeds never used by the training script's own evaluation):
- context reliance: each query answered with its own task's context and with another task's context (same noise);
  hit when the own-context answer is closer (PSNR) to the target. Chance 0.5 (a context-blind model scores 0: ties);
- query reliance: the answer is closer to its own target than to another query's target of the same task (chance 0.5);
- per task PSNR (IoU for binary maps) against copy-the-query, the task's mean target (one constant image per task)
  and a random-init model of the same configuration, and how many tasks beat copy / are within 2 dB of it.
MVDiT (`train/mvdit.py` default preset): the run's `caption_eval.json` (written at the end of training by
`genvis.pipelines.mvdit_evaluation`): per attribute read back from the generated clips (background colour, shape colour,
shape kind, motion direction), on trained captions and on held-out caption combinations, next to chance and to the
same clips scored against shuffled captions.
The numbers go in BENCHMARKS.md ("Learning").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genvis.models import LaVinDiTTransformer3DModel  # noqa: E402
from genvis.pipelines import LaVinDiTPipeline, evaluate_in_context, evaluate_reliance, psnr  # noqa: E402
from genvis.pipelines.lavin_dit_evaluation import BINARY_MAP_TASKS, binary_iou  # noqa: E402
from genvis.tasks import list_tasks, sample_episode  # noqa: E402

ACCELERATE = Path(sys.executable).parent / "accelerate"


def train(config: Path, output_dir: Path, script: str = "lavin_dit.py") -> float:
    """``accelerate launch train/<script> --config config`` into ``output_dir``; returns the wall seconds."""
    command = [str(ACCELERATE), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(ROOT / "train" / script), "--config", str(config),
               "--set", f"output_dir={output_dir}", "--set", "checkpoint.resume=false"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def load_pipeline(run: Path) -> LaVinDiTPipeline:
    pipe = LaVinDiTPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def constant_scores(episodes, answer_of) -> dict[str, dict[str, float]]:
    """Per-task mean PSNR (and IoU) of a baseline answer ``answer_of(episode)``."""
    sums: dict[str, dict[str, float]] = {}
    for episode in episodes:
        answer = answer_of(episode)
        entry = sums.setdefault(episode.task, {"psnr": 0.0, "iou": 0.0, "n": 0})
        entry["psnr"] += psnr(answer, episode.query_target)
        entry["iou"] += binary_iou(answer, episode.query_target) if episode.task in BINARY_MAP_TASKS else 0.0
        entry["n"] += 1
    return {t: {"psnr": e["psnr"] / e["n"], "iou": e["iou"] / e["n"]} for t, e in sums.items()}


def score_lavin(run: Path, episodes_per_task: int, label: str) -> dict:
    config = json.loads((run / "config.json").read_text())
    tasks = config["data"]["tasks"] or [t for kind in config["data"]["kinds"] for t in list_tasks(kind)]
    size, sampling = config["data"]["size"], config["sampling"]
    options = {"time_grid": sampling.get("time_grid"), "num_inference_steps": sampling.get("num_inference_steps"),
               "guidance_scale": sampling["guidance_scale"]}  # fmt: skip
    episodes = [sample_episode(task, 2, seed=20_000 + i, size=size, split="test") for task in tasks
                for i in range(episodes_per_task)]  # fmt: skip
    pipe = load_pipeline(run)
    scores, predictions = evaluate_in_context(pipe, episodes, return_predictions=True, **options)
    reliance = evaluate_reliance(pipe, episodes, predictions, **options)

    torch.manual_seed(0)  # the same architecture, untrained
    pipe.transformer = LaVinDiTTransformer3DModel.from_config(pipe.transformer.config).eval()
    random_scores, random_predictions = evaluate_in_context(pipe, episodes, return_predictions=True, **options)
    random_reliance = evaluate_reliance(pipe, episodes, random_predictions, **options)

    mean_target = {t: torch.stack([e.query_target for e in episodes if e.task == t]).mean(0) for t in tasks}
    mean_scores = constant_scores(episodes, lambda e: mean_target[e.task])

    rows = {}
    for task, s in scores.items():
        metric = "iou" if s.iou is not None else "psnr"
        rows[task] = {
            "metric": metric,
            "model": s.iou if metric == "iou" else s.psnr,
            "copy": s.iou_copy if metric == "iou" else s.psnr_copy,
            "mean_target": mean_scores[task][metric],
            "random_init": getattr(random_scores[task], metric),
        }
    beats = sum(r["model"] > r["copy"] for r in rows.values())
    within = sum(
        r["metric"] == "psnr" and r["model"] >= r["copy"] - 2 for r in rows.values() if r["model"] <= r["copy"]
    )
    result = {
        "label": label, "run": str(run), "episodes": len(episodes), "tasks": rows, "beats_copy": beats,
        "psnr_tasks_within_2db_of_copy_when_not_beating": within,
        "context_reliance": reliance.context_rate, "query_reliance": reliance.query_rate,
        "random_init_context_reliance": random_reliance.context_rate,
        "random_init_query_reliance": random_reliance.query_rate, "reliance_per_task": reliance.per_task,
    }  # fmt: skip
    print_lavin(result)
    return result


def print_lavin(r: dict) -> None:
    print(f"\n== LaVin-DiT ({r['label']}: {r['run']}), {r['episodes']} held-out episodes ==")
    print(f"{'task':26s} {'metric':6s} {'model':>7s} {'copy':>7s} {'mean tgt':>8s} {'random':>7s}  model-copy")
    for task, row in r["tasks"].items():
        print(f"{task:26s} {row['metric']:6s} {row['model']:7.2f} {row['copy']:7.2f} {row['mean_target']:8.2f} "
              f"{row['random_init']:7.2f}  {row['model'] - row['copy']:+.2f}")  # fmt: skip
    n = len(r["tasks"])
    print(f"tasks beating copy-the-query: {r['beats_copy']}/{n} (target >= 6); PSNR tasks not beating it but "
          f"within 2 dB: {r['psnr_tasks_within_2db_of_copy_when_not_beating']}")  # fmt: skip
    print(f"context reliance: {r['context_reliance']:.3f} (target >= 0.90; chance 0.5; random-init model "
          f"{r['random_init_context_reliance']:.3f})")  # fmt: skip
    print(f"query reliance:   {r['query_reliance']:.3f} (target >= 0.90; chance 0.5; random-init model "
          f"{r['random_init_query_reliance']:.3f})")  # fmt: skip


def score_mvdit(run: Path) -> dict:
    report = json.loads((run / "caption_eval.json").read_text())
    print(f"\n== MVDiT ({run}): caption following, {report['num_trained']} trained / {report['num_held_out']} held-out "
          "captions ==")  # fmt: skip
    print(f"{'attribute':12s} {'trained':>8s} {'held-out':>9s} {'chance':>7s} {'shuffled':>9s}")
    for attribute in ("background", "color", "kind", "motion", "all"):
        print(f"{attribute:12s} {report['trained'][attribute]:8.2f} {report['held_out'][attribute]:9.2f} "
              f"{report['chance'][attribute]:7.2f} {report['shuffled_captions'][attribute]:9.2f}")  # fmt: skip
    return {"label": "mvdit default", "run": str(run), **{k: report[k] for k in
            ("trained", "held_out", "chance", "shuffled_captions")}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lavin-run", type=Path, default=None, help="score this run instead of training one")
    parser.add_argument("--lavin-official", action="store_true", help="also train + score tiny_official.yaml")
    parser.add_argument("--mvdit-run", type=Path, default=None, help="score this MVDiT run instead of training one")
    parser.add_argument("--skip-mvdit", action="store_true")
    parser.add_argument("--episodes-per-task", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "learning")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: thread sync costs more than it saves (20x on a loaded 2-core box)
    results = []
    runs = []
    if args.lavin_run is not None:
        runs.append(("default (given run)", args.lavin_run, None))
    else:
        runs.append(("default tiny.yaml", args.out / "lavin_dit", ROOT / "train/configs/lavin_dit/tiny.yaml"))
    if args.lavin_official:
        runs.append(("official J-DiT tiny_official.yaml", args.out / "lavin_dit_official",
                     ROOT / "train/configs/lavin_dit/tiny_official.yaml"))  # fmt: skip
    for label, run, config in runs:
        seconds = train(config, run) if config is not None else None
        result = score_lavin(run, args.episodes_per_task, label)
        result["train_wall_seconds"] = seconds
        if seconds is not None:
            print(f"train wall time: {seconds:.0f} s (target <= 600 s on 2 idle cores)")
        results.append(result)
    if not args.skip_mvdit:
        mvdit_run, seconds = args.mvdit_run, None
        if mvdit_run is None:
            mvdit_run = args.out / "mvdit"
            seconds = train(ROOT / "train/configs/mvdit/tiny.yaml", mvdit_run, script="mvdit.py")
            print(f"MVDiT train wall time: {seconds:.0f} s (target <= 600 s on 2 idle cores)")
        results.append(score_mvdit(mvdit_run) | {"train_wall_seconds": seconds})
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
