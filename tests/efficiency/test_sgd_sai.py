"""SGD-SaI (genvis.training.optim): g-SNR scales fixed once, half of AdamW's state memory, it trains."""

import pytest
import torch

from genvis.models import LaVinDiTTransformer3DModel
from genvis.training.optim import (
    SGDSaI,
    build_optimizer,
    expected_state_bytes,
    gradient_snr,
    optimizer_state_bytes,
)


def _regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    y = torch.sin(x @ torch.randn(8, 1, generator=generator))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return model, x, y


def test_scales_are_measured_once_at_the_first_step():
    model, x, y = _regression()
    optimizer = SGDSaI(model.parameters(), lr=1e-3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    first = {p: gradient_snr(p.grad) for p in model.parameters()}
    optimizer.step()
    scales = optimizer.scales()
    assert set(scales) == set(model.parameters())
    for p, value in first.items():
        assert scales[p] == pytest.approx(float(value), rel=1e-6)
        if p.numel() > 1:
            assert scales[p] > 1.0  # norm / std of a multi-element gradient
    optimizer.zero_grad()
    (10 * torch.nn.functional.mse_loss(model(x * 3), y)).backward()  # very different gradients
    optimizer.step()
    assert optimizer.scales() == scales


def test_zero_gradient_blocks_wait_for_their_first_signal():
    # adaLN-zero DiTs: weights behind a zero gate get an all-zero gradient at step 1 and must not be frozen
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = SGDSaI([weight], lr=0.1)
    weight.grad = torch.zeros(4, 4)
    before = weight.detach().clone()
    optimizer.step()
    assert optimizer.scales() == {} and torch.equal(weight, before)
    weight.grad = torch.randn(4, 4)
    optimizer.step()
    assert optimizer.scales()[weight] == pytest.approx(float(gradient_snr(weight.grad)))
    assert not torch.equal(weight, before)


def test_degenerate_blocks_get_the_neutral_scale():
    assert float(gradient_snr(torch.tensor([3.0]))) == 1.0
    assert float(gradient_snr(torch.full((5,), 2.0))) == 1.0


def test_trains_a_tiny_regression():
    model, x, y = _regression()
    optimizer = build_optimizer("sgd_sai", model.parameters(), lr=0.1, weight_decay=1e-4)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_state_memory_is_about_half_of_adamw_on_the_tiny_dit():
    measured = {}
    for name in ("adamw", "sgd_sai"):
        torch.manual_seed(0)
        model = LaVinDiTTransformer3DModel.from_preset("tiny", in_channels=4)
        for p in model.parameters():
            p.grad = torch.randn_like(p)  # every tensor gets a (non-zero) gradient
        optimizer = build_optimizer(name, model.parameters(), lr=1e-4)
        optimizer.step()
        measured[name] = optimizer_state_bytes(optimizer)
        assert measured[name] == expected_state_bytes(name, model)
    ratio = measured["sgd_sai"] / measured["adamw"]
    assert 0.49 < ratio < 0.51, measured


def test_expected_bytes_from_meta_device_shapes():
    with torch.device("meta"):
        model = LaVinDiTTransformer3DModel.from_preset("tiny", in_channels=4)
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert expected_state_bytes("adamw", model) == 8 * params + 4 * tensors
    assert expected_state_bytes("sgd_sai", model) == 4 * params + 4 * tensors


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match=r"optim\.name"):
        build_optimizer("adam", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="momentum"):
        SGDSaI([torch.nn.Parameter(torch.zeros(2))], momentum=1.0)
