from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
from accelerate.state import AcceleratorState

from genvis.training import ConfigError, NonFiniteGuard, NonFiniteLossError, load_config, setup_accelerator


@pytest.fixture
def accelerator(tmp_path):
    AcceleratorState._reset_state(True)
    yield setup_accelerator(tmp_path, log_with=None)
    AcceleratorState._reset_state(True)


def test_guard_skips_non_finite_and_aborts_after_k(accelerator):
    guard = NonFiniteGuard(accelerator, max_consecutive=3)
    assert guard.check(torch.tensor(1.0), 0.5)
    assert not guard.check(torch.tensor(float("nan")))
    assert not guard.check(torch.tensor(1.0), float("inf"))  # finite loss, exploding gradient
    assert guard.check(torch.tensor(1.0), 1.0)  # a good step resets the streak
    assert guard.consecutive == 0 and guard.total_skipped == 2
    assert not guard.check(torch.tensor(float("inf")))
    assert not guard.check(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps at step 7"):
        guard.check(torch.tensor(float("nan")), step=7)


def test_skipped_step_leaves_weights_unchanged(accelerator):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    before = model.weight.detach().clone()
    guard = NonFiniteGuard(accelerator)
    loss = model(torch.full((2, 3), float("nan"))).sum()
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
    if guard.check(loss, norm):
        opt.step()
    opt.zero_grad()
    torch.testing.assert_close(model.weight, before)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    preset: Literal["tiny", "big"] = "tiny"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    note: str | None = None


def test_config_strict_loading(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 1\n")
    cfg = load_config(Cfg, path, ["optim.betas=[0.8, 0.9]", "preset=big"])
    assert cfg.steps == 20 and cfg.optim.lr == 1.0 and cfg.optim.betas == (0.8, 0.9) and cfg.preset == "big"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"p\.yaml\.optim: unknown key 'lrr'; did you mean lr"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"preset: expected one of \['tiny', 'big'\], got 'huge'"):
        load_config(Cfg, None, ["preset=huge"])
    with pytest.raises(ConfigError, match=r"^--set steps=ten: steps: expected int, got 'ten'"):
        load_config(Cfg, None, ["steps=ten"])
    assert load_config(Cfg, None, ["optim.lr=2e-3"]).optim.lr == 2e-3  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_config(Cfg, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
