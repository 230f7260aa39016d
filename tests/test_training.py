"""The one training machinery (epoch_loops/training.py): the global gradient clip over every parameter group,
the NaN stop before the step, and the settings a resume may and may not change."""

from __future__ import annotations

import pytest
import torch

from epoch_loops.training import Optimisation, adamw, optimiser_step, restore_settings
from utilities.checkpoint import save_checkpoint
from utilities.config import Config
from utilities.errors import InputError, TrainingError


def two_models_optimisation(grad_clip: float | None) -> tuple[Optimisation, list[torch.nn.Module]]:
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)]
    optimizer = adamw([(models[0], 1e-3), (models[1], 1e-3)], 0.01)  # 4 parameter groups, as PPO's
    return Optimisation("test", optimizer, grad_clip), models


def test_the_gradient_norm_is_clipped_globally_over_all_groups():
    opt, (a, b) = two_models_optimisation(grad_clip=1.0)
    x = torch.randn(8, 4)
    loss = 100 * b(a(x)).pow(2).sum()
    captured = []

    def record_norm(optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        captured.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    opt.optimizer.register_step_pre_hook(record_norm)
    norm = optimiser_step(opt, loss)
    assert norm > 10 and captured == [pytest.approx(1.0, rel=1e-4)]
    assert opt.step == 1


def test_a_non_finite_loss_stops_before_the_step_naming_it():
    opt, models = two_models_optimisation(grad_clip=None)
    before = [p.clone() for m in models for p in m.parameters()]
    with pytest.raises(
        TrainingError, match=r"test: non-finite loss \(nan\) at optimiser step 1 \(epoch 3\).*no checkpoint"
    ):
        optimiser_step(opt, torch.tensor(float("nan"), requires_grad=True), "epoch 3")
    assert all(
        torch.equal(p, q) for p, q in zip(before, (p for m in models for p in m.parameters()), strict=True)
    )


def saved_run(tmp_path, **settings) -> str:
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(
        path, {"config": {"procedure": "pointwise", "seed": 0, "epochs_num": 2, "device": "cuda", **settings}}
    )
    return str(path)


def test_resume_restores_the_run_settings_and_allows_only_run_local_flags(tmp_path):
    resume = saved_run(tmp_path, learning_rate=1e-3, num_workers=0)
    cfg = Config(
        given=frozenset({"procedure", "resume", "device", "num_workers", "seed"}),
        procedure="pointwise", resume=resume, seed=0, epochs_num=3, device="cpu", learning_rate=2e-5, num_workers=2,
    )  # fmt: skip
    restore_settings(cfg)
    assert (cfg.epochs_num, cfg.learning_rate) == (2, 1e-3)  # not given: the run's
    assert (cfg.device, cfg.num_workers) == ("cpu", 2)  # where it runs: this command's
    cfg = Config(
        given=frozenset({"resume", "epochs_num"}), resume=resume, epochs_num=3, procedure="pointwise"
    )
    with pytest.raises(InputError, match=r"--epochs_num 3 differs from the run's 2"):
        restore_settings(cfg)
