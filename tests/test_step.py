"""The training step's options (train.step): torch.compile trains what the eager step trains, bf16 autocast
keeps the weights and Adam in float32."""
import pytest
import torch

from train.loss import SimLoss
from train.model import Encoder, ModelSpec
from train.step import Objective, Step, StepOptions, native_bf16, resolve_autocast

SPEC = ModelSpec("sim", channels=16, hidden=8, batch_norm=True)


def make_step(options: StepOptions, lr: float = 1e-3) -> Step:
    torch.manual_seed(0)
    objective = Objective(Encoder(SPEC), SimLoss(SPEC))
    return Step(objective, torch.optim.Adam(objective.parameters(), lr=lr), options)


def run(step: Step, clips: torch.Tensor, steps: int) -> list[dict]:
    stats = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        stats.append({k: float(v) for k, v in step(clips).items()})
    return stats


def test_compiled_step_trains_as_the_eager_step_trains():
    """The compiled graph draws its posterior noise and negatives in another order than eager mode, so
    the two cannot be compared number for number beyond the noise-free first KL; the test holds the
    compiled step to the eager step's learning curve on a fixed batch instead (measured: 18.5 -> 14.5
    both, within 1 % of each other at every step)."""
    torch.manual_seed(1)
    clips = 0.1 * torch.randn(4, 10240)
    eager = run(make_step(StepOptions(), lr=3e-3), clips, 10)
    compiled = run(make_step(StepOptions(compile=True), lr=3e-3), clips, 10)
    assert compiled[0]["kl_m1"] == pytest.approx(eager[0]["kl_m1"], rel=1e-4)  # same weights, same input
    for curve in (eager, compiled):
        assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in curve)
        assert curve[-1]["loss"] < 0.85 * curve[0]["loss"]  # it learns
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=0.03)


def test_bf16_autocast_step_keeps_float32_weights_and_finite_losses():
    torch.manual_seed(1)
    clips = 0.1 * torch.randn(4, 10240)
    step = make_step(StepOptions(autocast="bf16"))
    stats = run(step, clips, 2)
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in stats)
    assert all(p.dtype == torch.float32 for p in step.model.parameters())
    assert all(s.dtype == torch.float32 for group in step.optimizer.state.values() for s in group.values()
               if torch.is_tensor(s) and s.is_floating_point())


def test_unknown_autocast_is_refused():
    with pytest.raises(ValueError, match="autocast"):
        StepOptions(autocast="fp8")


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "off")])
def test_auto_autocast_follows_the_cpus_bf16_units(monkeypatch, amx, expected):
    """auto is bf16 only where the CPU multiplies bfloat16 in hardware (AMX); an explicit choice is kept."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is amx
    assert resolve_autocast("auto", cpu) == expected
    assert resolve_autocast("off", cpu) == "off" and resolve_autocast("bf16", cpu) == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: assume none
    assert resolve_autocast("auto", cpu) == "off"
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast("fp16", cpu)
