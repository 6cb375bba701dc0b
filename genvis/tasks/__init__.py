"""In-context vision tasks for LaVin-DiT: (input, target) pairs with exact targets, built from the built-in data.

Public API (stable; ``train/lavin_dit.py`` and the LaVin pipeline use it):

- ``TASKS``: ``{name: InContextTask}``; ``list_tasks(kind=None)``; ``get_task(name, num_frames=None)``.
- ``InContextTask``: ``name``, ``kind`` (``"image"`` | ``"video"``), ``num_frames``, ``source`` (pool),
  ``make_pair(source, rng) -> (input, target)``, ``with_num_frames(n)``.
- ``sample_episode(task, num_pairs, seed, size=64, split="train", num_frames=None) -> Episode`` with
  ``context_pairs=[(input, target), ...]``, ``query``, ``query_target``, ``source_ids``. Every clip is float32 in
  ``[-1, 1]`` shaped ``(3, T, H, W)``; ``T = 1`` for image tasks, 5 by default for video tasks (1+4k suits the ST-VAE).
- ``TaskMixture``: map-style ``Dataset`` of episodes (``index -> episode`` deterministic), with ``collate_episodes``.
- ``split="test"`` draws from held-out real images, held-out video frames and held-out procedural seeds
  (``genvis.tasks.sources``), disjoint from ``"train"``.
- ``SourceDataset``: map-style raw clips of a source pool (no task), for VAE training / latent extraction.
- Decoders for predicted label maps: ``decode_binary_map`` (segmentation, edges), ``decode_depth_order``.

Image tasks: colorization, decolorization, edge_detection, denoising, deblurring, blurring, inpainting,
super_resolution_x2, super_resolution_x4, downsampling_x4, foreground_segmentation, depth_order. Video tasks:
frame_prediction, past_frame_prediction, frame_interpolation, video_reversal, video_colorization,
video_foreground_segmentation. Checked by ``tests/tasks/test_tasks.py``.
"""

from genvis.tasks.episodes import Episode, TaskMixture, collate_episodes, sample_episode
from genvis.tasks.ops import decode_binary_map, decode_depth_order, to_uint8
from genvis.tasks.registry import TASKS, InContextTask, get_task, list_tasks
from genvis.tasks.sources import HELD_OUT_IMAGES, SourceDataset, TaskSource, sample_source

__all__ = [
    "HELD_OUT_IMAGES",
    "TASKS",
    "Episode",
    "InContextTask",
    "SourceDataset",
    "TaskMixture",
    "TaskSource",
    "collate_episodes",
    "decode_binary_map",
    "decode_depth_order",
    "get_task",
    "list_tasks",
    "sample_episode",
    "sample_source",
    "to_uint8",
]
