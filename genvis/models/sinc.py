"""SINC meta-model: in-context classification from demonstrations of (encoder features, label) pairs.

SINC (Chen et al., ICCV 2023, arXiv 2307.07742) trains a small causal transformer on *self-supervised prompts*:
sequences ``[sim, x_1, y_1, ..., x_K, y_K, x_q]`` of frozen-encoder features ``x`` and label embeddings ``y``, and reads
the query's label at ``x_q`` through a GILE head scored against the label table. Labels are arbitrary symbols
re-drawn for every prompt, so the model can only answer by binding the query to the demonstrations: it transfers to
classes it has never seen, without gradient updates.

- :class:`SincMetaModel` (diffusers ``ModelMixin``): feature fuser (Linear -> ReLU -> Linear), symbol label table,
  correlation ("sim") token = Linear(mean_k(x_q * x_k)), optional per-demonstration correlation Linear(x_q * x_k),
  SINC's interleaved ``x_k, y_k`` layout or a fused ``x_k + y_k`` one (learns far faster on CPU), a ``transformers``
  GPT-2 (tiny config, from scratch) over ``inputs_embeds``, and the GILE head ``score(h, e) = w . [ReLU(W_h h) * ReLU(W_e e)]``. The loss is CE on the query
  position only.
- :class:`SincPromptBuilder`: prompts from a labelled (or pseudo-labelled) feature store: ``"nway"`` (N classes x
  K/N shots), ``"bursty"`` (mostly the query's class and one other), ``"retrieval"`` (the query's cosine nearest
  neighbours, torch only), ``"random"`` (any K samples); labels remapped to random symbols per prompt.
- :func:`pseudo_labels`: k-means cluster ids of encoder features, the self-supervised concepts used as training labels.
- :func:`nearest_class_mean`: the few-shot baseline on the same features.

Checked by tests/consumers/test_sinc.py: interleaving order, query-only loss, GILE broadcasting, N-way remapping
consistency, save/load, and few-shot accuracy on held-out scikit-learn digit classes against nearest-class-mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

__all__ = [
    "SINC_PRESETS",
    "SincMetaModel",
    "SincOutput",
    "SincPrompt",
    "SincPromptBuilder",
    "nearest_class_mean",
    "pseudo_labels",
]

PromptMode = Literal["nway", "bursty", "retrieval", "random"]


@dataclass
class SincOutput(BaseOutput):
    """Outputs of :class:`SincMetaModel`.

    Args:
        logits: ``(B, num_label_symbols)`` GILE scores of the query (restricted ways are -inf).
        example_logits: ``(B, K, num_label_symbols)`` scores read at each demonstration's ``x`` position (None for the
            fused layout, where a demonstration's token already carries its label).
        loss: CE of the query logits against ``query_labels`` (None without labels).
    """

    logits: torch.Tensor = None
    example_logits: torch.Tensor = None
    loss: torch.Tensor | None = None


class SincGILEHead(nn.Module):
    """Generalised input-label embedding head: ``w . [ReLU(W_h h) * ReLU(W_e e)] + b`` for every label ``e``.

    Args:
        hidden_size: width of ``h``.
        label_dim: width of the label embeddings.
        head_dim: width of the joint space (SINC: 64).
    """

    def __init__(self, hidden_size: int, label_dim: int, head_dim: int) -> None:
        super().__init__()
        self.proj_hidden = nn.Linear(hidden_size, head_dim)
        self.proj_label = nn.Linear(label_dim, head_dim)
        self.score = nn.Linear(head_dim, 1)

    def forward(self, hidden_states: torch.Tensor, label_table: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` x ``(L, label_dim)`` -> ``(..., L)`` scores (broadcast over the whole table)."""
        joint = F.relu(self.proj_hidden(hidden_states))[..., None, :] * F.relu(
            self.proj_label(label_table)
        )  # (..., L, d)
        return self.score(joint).squeeze(-1)


class SincMetaModel(ModelMixin, ConfigMixin):
    """In-context meta-model over ``[sim, (x, y) x K, x_q]`` sequences (SINC).

    Args:
        feature_dim: width of the frozen encoder features.
        hidden_size: meta-model width.
        num_layers: GPT-2 blocks.
        num_attention_heads: GPT-2 heads.
        num_label_symbols: size of the symbol label table (the largest number of ways in a prompt).
        max_examples: largest number of demonstrations K (sets the position table: ``2K + 2`` positions).
        correlation_token: prepend the ``sim`` token Linear(mean_k(x_q * x_k)).
        head_dim: GILE joint width.
        dropout: GPT-2 residual/attention/embedding dropout.
        example_layout: ``"interleaved"`` (SINC: ``[sim, x_1, y_1, ..., x_K, y_K, x_q]``; binding a query to a label
            needs a two-layer induction circuit, which emerges only after a long plateau at ``ln N``) or ``"fused"``
            (``[sim, x_1 + y_1, ..., x_K + y_K, x_q]``: one token per demonstration, so a single attention layer can
            match the query to a demonstration and copy its label; learns within a few hundred CPU steps).
            ``example_logits`` are only defined for ``"interleaved"``.
        example_correlation: add Linear(x_q * x_k) to each demonstration's feature token (a per-example version of
            SINC's sim token, which averages over k): the meta-model sees how each demonstration matches the query.
    """

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 64,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_attention_heads: int = 4,
        num_label_symbols: int = 8,
        max_examples: int = 16,
        correlation_token: bool = True,
        head_dim: int = 64,
        dropout: float = 0.0,
        example_layout: Literal["interleaved", "fused"] = "interleaved",
        example_correlation: bool = False,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        for name in ("feature_dim", "hidden_size", "num_layers", "num_attention_heads", "num_label_symbols"):
            if int(self.config[name]) < 1:
                raise ValueError(f"{name} must be >= 1, got {self.config[name]}")
        if example_layout not in ("interleaved", "fused"):
            raise ValueError(f"example_layout must be 'interleaved' or 'fused', got {example_layout!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        # 1. feature fuser (SINC: Linear -> ReLU -> Linear to the meta width) and symbol label table
        self.feature_proj = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.label_embedding = nn.Embedding(num_label_symbols, hidden_size)
        self.correlation_proj = nn.Linear(feature_dim, hidden_size) if correlation_token else None
        self.example_correlation_proj = nn.Linear(feature_dim, hidden_size) if example_correlation else None
        # 2. causal GPT-2 from scratch over inputs_embeds (SINC's "tiny": 128 wide, 2 layers)
        gpt2_config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_attention_heads,
            n_positions=2 * max_examples + 2,  # enough for either layout
            vocab_size=1,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        self.transformer = GPT2Model(gpt2_config)
        # the sequence enters as inputs_embeds: the (1-row) token table is never used, keep it out of training
        self.transformer.wte.weight.requires_grad_(False)
        # 3. GILE head scored against the same label table the inputs use
        self.head = SincGILEHead(hidden_size, hidden_size, head_dim)

    def build_sequence(
        self, example_features: torch.Tensor, example_labels: torch.Tensor, query_features: torch.Tensor
    ) -> torch.Tensor:
        """``[sim, x_1, y_1, ..., x_K, y_K, x_q]`` embeddings ``(B, 2K + 1 (+1), hidden)``, or for the fused layout
        ``[sim, x_1 + y_1, ..., x_K + y_K, x_q]`` ``(B, K + 1 (+1), hidden)``."""
        batch, shots = example_labels.shape
        xs = self.feature_proj(example_features)  # (B, K, hidden)
        if self.example_correlation_proj is not None:
            xs = xs + self.example_correlation_proj(query_features[:, None] * example_features)
        ys = self.label_embedding(example_labels)  # (B, K, hidden)
        if self.config.example_layout == "fused":
            pairs = xs + ys  # (B, K, hidden): one token per demonstration
        else:
            pairs = torch.stack([xs, ys], dim=2).reshape(batch, 2 * shots, -1)  # (B, 2K, hidden): x_1, y_1, x_2, ...
        parts = [pairs, self.feature_proj(query_features)[:, None]]
        if self.correlation_proj is not None:
            sim = (query_features[:, None] * example_features).mean(1)  # (B, F)
            parts.insert(0, self.correlation_proj(sim)[:, None])
        return torch.cat(parts, dim=1)

    def forward(
        self,
        example_features: torch.Tensor,
        example_labels: torch.Tensor,
        query_features: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        num_ways: int | None = None,
        return_dict: bool = True,
    ) -> SincOutput | tuple:
        """Predict the query's label symbol from the demonstrations.

        Args:
            example_features: ``(B, K, F)`` demonstration features.
            example_labels: ``(B, K)`` long symbol ids in ``[0, num_label_symbols)``.
            query_features: ``(B, F)``.
            query_labels: ``(B,)`` symbol ids for the loss.
            num_ways: restrict the scores to symbols ``0..num_ways-1`` (N-way evaluation and training prompts).
        """
        config = self.config
        if example_features.ndim != 3 or example_features.shape[-1] != config.feature_dim:
            raise ValueError(
                f"example_features must be (B, K, feature_dim={config.feature_dim}), got {tuple(example_features.shape)}"
            )
        batch, shots = example_features.shape[:2]
        if shots > config.max_examples:
            raise ValueError(f"got K={shots} demonstrations, over max_examples={config.max_examples}")
        if example_labels.shape != (batch, shots):
            raise ValueError(f"example_labels must be ({batch}, {shots}), got {tuple(example_labels.shape)}")
        if query_features.shape != (batch, config.feature_dim):
            raise ValueError(
                f"query_features must be ({batch}, {config.feature_dim}), got {tuple(query_features.shape)}"
            )
        ways = num_ways or config.num_label_symbols
        if not 1 <= ways <= config.num_label_symbols:
            raise ValueError(f"num_ways must be in [1, num_label_symbols={config.num_label_symbols}], got {num_ways}")
        if example_labels.numel() and (example_labels.min() < 0 or example_labels.max() >= ways):
            raise ValueError(
                f"example_labels must be symbols in [0, {ways}), got range "
                f"[{int(example_labels.min())}, {int(example_labels.max())}]"
            )

        sequence = self.build_sequence(example_features, example_labels, query_features)
        hidden = self.transformer(inputs_embeds=sequence).last_hidden_state  # (B, S, hidden), causal
        offset = int(self.correlation_proj is not None)
        table = self.label_embedding.weight[:ways]  # (ways, hidden)
        logits = self.head(hidden[:, -1], table)  # (B, ways)
        example_logits = None
        if config.example_layout == "interleaved":
            # x_k sits at offset + 2k: its prediction sees only the demonstrations before it
            example_logits = self.head(hidden[:, offset : offset + 2 * shots : 2], table)  # (B, K, ways)
        loss = F.cross_entropy(logits, query_labels) if query_labels is not None else None
        output = SincOutput(logits=logits, example_logits=example_logits, loss=loss)
        return output if return_dict else output.to_tuple()


# Size presets, named as SINC's from-scratch GPT-2 sizes (plus "micro" for CPU tests).
SINC_PRESETS: dict[str, dict] = {
    "micro": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4},  # CPU tests
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4},
    "mini": {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 512, "num_layers": 4, "num_attention_heads": 8},
}


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class SincPrompt:
    """A batch of prompts.

    Args:
        example_features: ``(B, K, F)``.
        example_labels: ``(B, K)`` symbols.
        query_features: ``(B, F)``.
        query_labels: ``(B,)`` symbols.
        example_classes: ``(B, K)`` original class ids (for analysis).
        query_classes: ``(B,)`` original class ids.
    """

    example_features: torch.Tensor
    example_labels: torch.Tensor
    query_features: torch.Tensor
    query_labels: torch.Tensor
    example_classes: torch.Tensor
    query_classes: torch.Tensor


class SincPromptBuilder:
    """Samples prompts from a feature store with (pseudo-)labels.

    Args:
        features: ``(N, F)`` frozen encoder features.
        labels: ``(N,)`` class or pseudo-label ids.
        num_ways: classes per prompt N; their labels are a random permutation of symbols ``0..N-1`` per prompt.
        shots: demonstrations K (a multiple of N for ``"nway"``).
        bursty_ratio: for ``mode="bursty"``, the probability of a bursty prompt (else a random one).
        num_neighbours: pool of cosine nearest neighbours for ``"retrieval"``.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        num_ways: int = 2,
        shots: int = 4,
        bursty_ratio: float = 0.9,
        num_neighbours: int = 32,
    ) -> None:
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"features (N, F) and labels (N,) must match, got {tuple(features.shape)}, {tuple(labels.shape)}"
            )
        self.features, self.labels = features, labels.long()
        classes, counts = torch.unique(self.labels, return_counts=True)
        # a prompt's classes need a query plus at least one other member (singleton k-means clusters do not qualify)
        self.classes = classes[counts >= 2]
        if len(self.classes) < num_ways:
            raise ValueError(
                f"num_ways={num_ways} needs at least that many classes with >= 2 samples, got {len(self.classes)}"
            )
        if shots % num_ways:
            raise ValueError(f"shots ({shots}) must be a multiple of num_ways ({num_ways})")
        self.num_ways, self.shots, self.bursty_ratio = num_ways, shots, bursty_ratio
        self.members = {int(c): torch.nonzero(self.labels == c).flatten() for c in self.classes}
        self.num_neighbours = num_neighbours
        self._neighbours: torch.Tensor | None = None

    def _pick(self, cls: int, count: int, generator: torch.Generator, exclude: int | None = None) -> torch.Tensor:
        pool = self.members[cls]
        if exclude is not None:
            pool = pool[pool != exclude]
        return pool[torch.randint(len(pool), (count,), generator=generator)]

    def neighbours(self) -> torch.Tensor:
        """``(N, num_neighbours)`` cosine nearest neighbours of every sample (itself excluded), computed once."""
        if self._neighbours is None:
            unit = F.normalize(self.features.float(), dim=-1)
            similarity = unit @ unit.T
            similarity.fill_diagonal_(-2.0)
            self._neighbours = similarity.topk(min(self.num_neighbours, len(unit) - 1), dim=-1).indices
        return self._neighbours

    def sample(
        self, batch_size: int, mode: PromptMode = "nway", generator: torch.Generator | None = None
    ) -> SincPrompt:
        """Draw ``batch_size`` prompts (query class always among the demonstrations for nway/bursty)."""
        if mode not in ("nway", "bursty", "retrieval", "random"):
            raise ValueError(f"mode must be 'nway', 'bursty', 'retrieval' or 'random', got {mode!r}")
        generator = generator or torch.Generator().manual_seed(0)
        n, k = self.num_ways, self.shots
        ex_idx, q_idx, ex_cls, q_cls, ex_sym, q_sym = [], [], [], [], [], []
        for _ in range(batch_size):
            prompt_mode = mode
            if mode == "bursty" and torch.rand((), generator=generator) >= self.bursty_ratio:
                prompt_mode = "random"
            chosen = self.classes[torch.randperm(len(self.classes), generator=generator)[:n]]
            query_class = int(chosen[0])
            query = int(self._pick(query_class, 1, generator))
            if prompt_mode in ("nway", "bursty"):
                # N classes x K/N shots; bursty (SINC) uses N=2 with the same balanced layout
                idx = torch.cat([self._pick(int(c), k // n, generator, exclude=query) for c in chosen])
            elif prompt_mode == "retrieval":
                pool = self.neighbours()[query]
                idx = pool[torch.randperm(len(pool), generator=generator)[:k]]
            else:
                idx = torch.randint(len(self.labels), (k,), generator=generator)
            idx = idx[torch.randperm(k, generator=generator)]
            classes = self.labels[idx]
            # random symbols per prompt: classes seen in the prompt (query class first) -> permuted 0..n-1
            present = [query_class] + [int(c) for c in torch.unique(classes) if int(c) != query_class]
            symbols = torch.randperm(max(n, len(present)), generator=generator)
            mapping = {c: int(symbols[i % len(symbols)]) % n for i, c in enumerate(present)}
            ex_idx.append(idx)
            q_idx.append(query)
            ex_cls.append(classes)
            q_cls.append(query_class)
            ex_sym.append(torch.tensor([mapping[int(c)] for c in classes]))
            q_sym.append(mapping[query_class])
        ex_idx_t = torch.stack(ex_idx)
        return SincPrompt(
            example_features=self.features[ex_idx_t],
            example_labels=torch.stack(ex_sym),
            query_features=self.features[torch.tensor(q_idx)],
            query_labels=torch.tensor(q_sym),
            example_classes=torch.stack(ex_cls),
            query_classes=torch.tensor(q_cls),
        )


def pseudo_labels(features: torch.Tensor, num_clusters: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """Self-supervised concepts: spherical k-means (k-means++ init) cluster ids of ``(N, F)`` features, ``(N,)``."""
    if not 1 <= num_clusters <= features.shape[0]:
        raise ValueError(f"num_clusters must be in [1, N={features.shape[0]}], got {num_clusters}")
    generator = torch.Generator().manual_seed(seed)
    unit = F.normalize(features.float(), dim=-1)
    centres = unit[torch.randint(len(unit), (1,), generator=generator)]
    for _ in range(1, num_clusters):  # k-means++: next centre drawn proportional to squared distance
        distance = (2 - 2 * (unit @ centres.T)).clamp_min(0).min(dim=1).values
        centres = torch.cat([centres, unit[torch.multinomial(distance + 1e-12, 1, generator=generator)]])
    for _ in range(iterations):
        assign = (unit @ centres.T).argmax(dim=1)
        for c in range(num_clusters):
            members = unit[assign == c]
            if len(members):
                centres[c] = F.normalize(members.mean(0), dim=0)
    return (unit @ centres.T).argmax(dim=1)


def nearest_class_mean(
    example_features: torch.Tensor, example_labels: torch.Tensor, query_features: torch.Tensor, num_ways: int
) -> torch.Tensor:
    """Baseline: cosine similarity of the query to each symbol's mean demonstration, ``(B,)`` predicted symbols."""
    unit = F.normalize(example_features.float(), dim=-1)  # (B, K, F)
    onehot = F.one_hot(example_labels, num_ways).float()  # (B, K, N)
    means = F.normalize(torch.einsum("bkn,bkf->bnf", onehot, unit), dim=-1)  # (B, N, F)
    scores = torch.einsum("bnf,bf->bn", means, F.normalize(query_features.float(), dim=-1))
    return scores.argmax(dim=-1)
