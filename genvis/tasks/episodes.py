"""In-context episodes: ``sample_episode`` and the map-style ``TaskMixture`` dataset used for training.

An episode is ``num_pairs`` context pairs plus one query and its target, all drawn from the same task and split. It is
a pure function of ``(task, num_pairs, seed, size, split)``, and ``TaskMixture[index]`` is a pure function of
``(mixture seed, index)``, so a resumed run that replays the same indices sees the same data. Checked by
``tests/tasks/test_tasks.py``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from genvis.tasks.registry import InContextTask, TaskKind, get_task, list_tasks
from genvis.tasks.sources import Split, check_split, sample_source


@dataclass
class Episode:
    """One in-context example.

    Args:
        task: task name.
        context_pairs: ``[(input, target), ...]``, each ``(3, T, H, W)`` float in ``[-1, 1]``.
        query: ``(3, T, H, W)`` input whose target is to be generated.
        query_target: ``(3, T, H, W)`` exact answer for ``query``.
        source_ids: provenance of every pair's source (context pairs first, then the query).
    """

    task: str
    context_pairs: list[tuple[torch.Tensor, torch.Tensor]]
    query: torch.Tensor
    query_target: torch.Tensor
    source_ids: list[str]

    @property
    def num_pairs(self) -> int:
        return len(self.context_pairs)

    @property
    def num_frames(self) -> int:
        return self.query.shape[1]

    def clips(self) -> list[torch.Tensor]:
        """Every clip in sequence order: ``[in_1, out_1, ..., in_n, out_n, query, query_target]``."""
        ordered = [clip for pair in self.context_pairs for clip in pair]
        return [*ordered, self.query, self.query_target]


MAX_COLOUR_REDRAWS = 32  # colour tasks redraw greyscale sources at most this often (the pools are mostly colour)


def is_greyscale(clip: torch.Tensor, tolerance: float = 0.02) -> bool:
    """True when every pixel's channels agree within ``tolerance`` (on the [-1, 1] scale): a grey image or clip."""
    return bool((clip.amax(dim=0) - clip.amin(dim=0)).max() <= tolerance)


def _check_size(size: int) -> None:
    # 8x: the ST-VAE's spatial compression (also covers the x4 super-resolution tasks); 16: procedural videos.
    if not isinstance(size, int) or size < 16 or size % 8:
        raise ValueError(f"size: expected an int >= 16 divisible by 8, got {size!r}")


def episode_rng(task: InContextTask, seed: int, size: int, split: Split) -> np.random.Generator:
    """The generator of one episode; the task name enters through a stable hash (crc32), not Python's ``hash``."""
    split_index = 0 if split == "train" else 1
    key = [int(seed), zlib.crc32(task.name.encode()), split_index, int(size), task.num_frames]
    return np.random.default_rng(np.random.SeedSequence(key))


def sample_episode(
    task: str | InContextTask,
    num_pairs: int,
    seed: int,
    size: int = 64,
    split: Split = "train",
    num_frames: int | None = None,
) -> Episode:
    """Draw an episode of ``task``: ``num_pairs`` context pairs and a query, each from an independent source.

    Args:
        task: a registered name or an ``InContextTask``.
        num_pairs: number of context pairs (0 gives a query-only episode).
        seed: episode seed; same arguments -> bit-identical episode.
        size: square frame side in pixels (>= 16, divisible by 8).
        split: ``"train"`` or the held-out ``"test"`` pool (see ``genvis.tasks.sources``).
        num_frames: clip length override for video tasks.
    """
    task = get_task(task, num_frames=num_frames)
    _check_size(size)
    check_split(split)
    if num_pairs < 0:
        raise ValueError(f"num_pairs: expected >= 0, got {num_pairs}")
    rng = episode_rng(task, seed, size, split)
    pairs, source_ids = [], []
    for _ in range(num_pairs + 1):
        source = sample_source(task.source, rng, task.source_num_frames, size, split)
        for _ in range(MAX_COLOUR_REDRAWS if task.colour_sources else 0):
            if not is_greyscale(source.pixels):
                break
            source = sample_source(task.source, rng, task.source_num_frames, size, split)
        pairs.append(task.make_pair(source, rng))
        source_ids.append(source.source_id)
    query, query_target = pairs.pop()
    return Episode(task.name, pairs, query, query_target, source_ids)


class TaskMixture(Dataset):
    """Map-style dataset of episodes over several tasks: ``mixture[index]`` is deterministic for ``(seed, index)``.

    Episodes of different tasks have different frame counts, and ``num_pairs`` may vary, so batches are lists:
    use ``collate_fn=collate_episodes`` in the ``DataLoader``.

    Args:
        tasks: task names (default: every registered task of ``kinds``).
        weights: sampling weight per task (default uniform); normalised internally.
        num_pairs: context pairs per episode, an int or an inclusive ``(low, high)`` range drawn per episode.
        size: frame side in pixels.
        split: ``"train"`` or ``"test"``.
        length: number of episodes (``__len__``); indices beyond it are valid too but samplers stop there.
        seed: mixture seed.
        num_frames: clip length of the video tasks (None keeps each task's default, 5).
        kinds: restrict the default task list to ``("image",)`` or ``("video",)``.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        num_pairs: int | tuple[int, int] = 2,
        size: int = 64,
        split: Split = "train",
        length: int = 100_000,
        seed: int = 0,
        num_frames: int | None = None,
        kinds: Sequence[TaskKind] = ("image", "video"),
    ) -> None:
        names = list(tasks) if tasks is not None else [name for kind in kinds for name in list_tasks(kind)]
        if not names:
            raise ValueError(f"tasks: expected at least one task, got {names} (kinds={kinds})")
        self.tasks = [
            get_task(name, num_frames=num_frames if get_task(name).kind == "video" else None) for name in names
        ]
        if weights is None:
            weights = [1.0] * len(self.tasks)
        if len(weights) != len(self.tasks) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"weights: expected {len(self.tasks)} non-negative values with a positive sum, got {list(weights)}"
            )
        self.probabilities = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        low, high = (num_pairs, num_pairs) if isinstance(num_pairs, int) else tuple(num_pairs)
        if not 0 <= low <= high:
            raise ValueError(
                f"num_pairs: expected an int >= 0 or a (low, high) range with 0 <= low <= high, got {num_pairs}"
            )
        self.num_pairs_range = (int(low), int(high))
        _check_size(size)
        check_split(split)
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        self.size, self.split, self.length, self.seed = size, split, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episode:
        if index < 0:
            raise IndexError(f"index: expected >= 0, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
        num_pairs = int(rng.integers(self.num_pairs_range[0], self.num_pairs_range[1] + 1))
        episode_seed = int(rng.integers(2**62))
        return sample_episode(task, num_pairs, episode_seed, size=self.size, split=self.split)


def collate_episodes(episodes: list[Episode]) -> list[Episode]:
    """``DataLoader`` collate function for ``TaskMixture``: keep the episodes as a list (variable shapes).

    Every clip of the batch becomes a view of one flat tensor, so a worker hands the batch to the main process as one
    shared-memory block instead of one file descriptor per clip (23 ms -> 3 ms of main-process CPU per batch of 16
    episodes at 32 px).
    """
    clips = [clip for episode in episodes for clip in episode.clips()]
    if not clips or len({(clip.dtype, clip.device) for clip in clips}) > 1:
        return list(episodes)
    flat = torch.cat([clip.reshape(-1) for clip in clips])
    views = iter(flat.split([clip.numel() for clip in clips]))
    batch = []
    for episode in episodes:
        pairs = [(next(views).view(a.shape), next(views).view(b.shape)) for a, b in episode.context_pairs]
        query = next(views).view(episode.query.shape)
        target = next(views).view(episode.query_target.shape)
        batch.append(Episode(episode.task, pairs, query, target, list(episode.source_ids)))
    return batch
