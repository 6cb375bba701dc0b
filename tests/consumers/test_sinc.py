"""SINC meta-model: prompt layout, query-only loss, GILE head, N-way symbols, round trip, few-shot on held-out digits."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genvis.models.sinc import SincMetaModel, SincPromptBuilder, nearest_class_mean, pseudo_labels

REPO = Path(__file__).resolve().parents[2]


def _model(**kwargs) -> SincMetaModel:
    torch.manual_seed(0)
    return SincMetaModel(
        **{"feature_dim": 12, "hidden_size": 32, "num_attention_heads": 2, "num_label_symbols": 3, **kwargs}
    )


def _store(num_classes: int = 5, per_class: int = 12, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_interleaving_order_is_x_y_pairs_then_query():
    model = _model(correlation_token=False)
    x, y, q = torch.randn(2, 4, 12), torch.randint(0, 3, (2, 4)), torch.randn(2, 12)
    sequence = model.build_sequence(x, y, q)
    assert sequence.shape == (2, 9, 32)
    torch.testing.assert_close(sequence[:, 0:8:2], model.feature_proj(x))
    torch.testing.assert_close(sequence[:, 1:8:2], model.label_embedding(y))
    torch.testing.assert_close(sequence[:, -1], model.feature_proj(q))
    with_sim = _model().build_sequence(x, y, q)
    assert with_sim.shape == (2, 10, 32)  # [sim, (x, y) x 4, x_q]


def test_loss_is_query_only_and_prediction_is_causal():
    model = _model()
    x, y, q, target = torch.randn(2, 4, 12), torch.randint(0, 3, (2, 4)), torch.randn(2, 12), torch.tensor([0, 2])
    out = model(x, y, q, target)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, target))
    # x_2's prediction must not see demonstrations 3 and 4 (causal transformer; the sim token, which summarises
    # all demonstrations by design, is off here)
    model = _model(correlation_token=False)
    out = model(x, y, q)
    later = model(x.clone().index_fill_(1, torch.tensor([2, 3]), 5.0), y, q).example_logits
    torch.testing.assert_close(later[:, :2], out.example_logits[:, :2])
    assert (later[:, 2:] - out.example_logits[:, 2:]).abs().max() > 1e-4


def test_gile_head_broadcasts_over_the_label_table():
    model = _model()
    hidden, table = torch.randn(2, 5, 32), torch.randn(7, 32)
    scores = model.head(hidden, table)
    assert scores.shape == (2, 5, 7)
    torch.testing.assert_close(scores[:, :, 3], model.head(hidden, table[3:4])[..., 0])


def test_nway_symbols_are_consistent_per_prompt():
    features, labels = _store()
    builder = SincPromptBuilder(features, labels, num_ways=3, shots=6)
    prompt = builder.sample(50, "nway", torch.Generator().manual_seed(1))
    for classes, symbols, q_class, q_symbol in zip(
        prompt.example_classes, prompt.example_labels, prompt.query_classes, prompt.query_labels
    ):
        mapping = {}
        for c, s in zip(classes.tolist(), symbols.tolist()):
            assert mapping.setdefault(c, s) == s  # one symbol per class
        assert sorted(mapping.values()) == [0, 1, 2] and len(mapping) == 3
        assert mapping[int(q_class)] == int(q_symbol)
        assert torch.bincount(classes).max() == 2  # K/N shots of each class
    # symbols are re-drawn per prompt: the same class does not always get the same symbol
    first_class_symbols = {int(s) for c, s in zip(prompt.query_classes, prompt.query_labels) if int(c) == 0}
    assert len(first_class_symbols) > 1
    for mode in ("bursty", "retrieval", "random"):
        sample = builder.sample(8, mode, torch.Generator().manual_seed(2))
        assert sample.example_labels.max() < 3 and sample.query_labels.max() < 3


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="example_features"):
        model(torch.randn(2, 4, 11), torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 12))
    with pytest.raises(ValueError, match="max_examples"):
        model(torch.randn(2, 17, 12), torch.zeros(2, 17, dtype=torch.long), torch.randn(2, 12))
    with pytest.raises(ValueError, match="example_labels must be symbols"):
        model(torch.randn(2, 4, 12), torch.full((2, 4), 2), torch.randn(2, 12), num_ways=2)
    features, labels = _store()
    with pytest.raises(ValueError, match="multiple of num_ways"):
        SincPromptBuilder(features, labels, num_ways=3, shots=4)


def test_round_trip_and_every_parameter_gets_a_gradient(tmp_path):
    model = _model()
    x, y, q, target = torch.randn(3, 4, 12), torch.randint(0, 3, (3, 4)), torch.randn(3, 12), torch.tensor([0, 1, 2])
    out = model(x, y, q, target)
    out.loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing
    model.save_pretrained(tmp_path)
    loaded = SincMetaModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y, q).logits, model(x, y, q).logits, atol=1e-6, rtol=1e-6)


def test_pseudo_labels_recover_separated_clusters_and_ncm_baseline():
    features, labels = _store(num_classes=4, per_class=20)
    clusters = pseudo_labels(features, 4, seed=0)
    # every true class maps to one cluster (a permutation)
    assert all(len(torch.unique(clusters[labels == c])) == 1 for c in range(4))
    builder = SincPromptBuilder(features, labels, num_ways=2, shots=4)
    prompt = builder.sample(200, "nway")
    predicted = nearest_class_mean(prompt.example_features, prompt.example_labels, prompt.query_features, 2)
    assert (predicted == prompt.query_labels).float().mean() > 0.95


def _script_main():
    sys.path.insert(0, str(REPO / "train"))
    try:
        import sinc as script
    finally:
        sys.path.pop(0)
    return script.main


def test_fused_layout_interleaves_nothing_and_skips_example_logits():
    model = _model(example_layout="fused")
    x, y, q = torch.randn(2, 4, 12), torch.randint(0, 3, (2, 4)), torch.randn(2, 12)
    sequence = model.build_sequence(x, y, q)
    assert sequence.shape == (2, 6, 32)  # [sim, x_1 + y_1, ..., x_4 + y_4, x_q]
    torch.testing.assert_close(sequence[:, 1:5], model.feature_proj(x) + model.label_embedding(y))
    out = model(x, y, q)
    assert out.logits.shape == (2, 3) and out.example_logits is None
    # per-example correlation: each demonstration token also carries Linear(x_q * x_k)
    corr = _model(example_layout="fused", example_correlation=True)
    expected = corr.feature_proj(x) + corr.example_correlation_proj(q[:, None] * x) + corr.label_embedding(y)
    torch.testing.assert_close(corr.build_sequence(x, y, q)[:, 1:5], expected)
    with pytest.raises(ValueError, match="example_layout"):
        _model(example_layout="stacked")


@pytest.mark.slow
def test_self_supervised_training_gives_few_shot_on_held_out_digits(tmp_path):
    """train/sinc.py: k-means pseudo-labels of digits 0-5 only; 2-way 4-shot on unseen digits 6-9, symbolic labels.

    Measured (2 shared CPU cores, 120 steps, ~15-25 s): meta-model 0.84, nearest-class-mean 0.91 on the same
    standardised pixels, chance 0.5. The meta-model clearly learns in context but does not reach NCM at this budget.
    """
    settings = {
        "output_dir": tmp_path,
        "model.preset": "micro",
        "optim.lr": 0.002,
        "schedule.max_steps": 120,
        "eval.episodes": 1000,
        "checkpoint.every_steps": 1000,
        "logging.tracker": "null",
    }
    metrics = _script_main()([item for k, v in settings.items() for item in ("--set", f"{k}={v}")])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    config = SincMetaModel.from_pretrained(tmp_path / "model").config
    assert config.example_layout == "fused" and config.example_correlation
    # chance is 0.5; 1000 episodes give a standard error of ~0.012-0.016
    assert metrics["heldout_meta_accuracy"] > 0.75, metrics
    # the baseline is reported on the same episodes; it stays ahead on raw pixels (README states the gap)
    assert 0.8 < metrics["heldout_ncm_accuracy"] <= 1.0, metrics
