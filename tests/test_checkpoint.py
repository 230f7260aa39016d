"""Checkpoints: atomic writes, safe loads, clear errors, and exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utilities import checkpoint as ckpt
from utilities.checkpoint import (
    load_checkpoint,
    load_model_state,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from utilities.config import Config
from utilities.errors import InputError
from utilities.seeding import data_generator, seed_everything


class Evil:
    """Unpickling this would call `print` (stands in for arbitrary code)."""

    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))


def test_round_trip_keeps_tensors_and_plain_containers(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "meta": {"epoch": 3, "names": ["a", "b"], "best": None}}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["meta"] == state["meta"]


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"version": torch.tensor(1)})

    def save_half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"version": torch.tensor(2)})
    monkeypatch.undo()
    assert load_checkpoint(path)["version"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "the temporary file must be cleaned up"


def test_refuses_pickled_objects_other_than_tensors(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Evil()}, path)
    with pytest.raises(InputError, match="pickled objects other than tensors"):
        load_checkpoint(path)
    assert "arbitrary code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_or_truncated_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        save_checkpoint(path, {"w": torch.ones(100)})
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.pt: corrupt"):
        load_checkpoint(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_incompatible_state_names_missing_unexpected_and_misshaped_keys():
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["0.bias"]
    state["3.weight"] = torch.zeros(2, 8)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError) as err:
        load_model_state(model, state, "E_3/agent.pt")
    message = str(err.value)
    assert "E_3/agent.pt" in message
    assert "missing keys (1): 0.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "3.weight: checkpoint (2, 8) vs model (1, 8)" in message


def train(model, optimizer, generator, steps, start=0):
    """A tiny training loop that uses every source of randomness: data order, dropout, sampled noise."""
    data = torch.linspace(-1, 1, 64).view(16, 4)
    for _ in range(start, steps):
        index = torch.randperm(16, generator=generator)[:4]
        x = data[index] + 0.01 * torch.randn(4, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fresh(seed):
    seed_everything(seed)
    model = small_model()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), data_generator(seed)


def test_resume_gives_identical_weights(tmp_path):
    steps, cfg = 10, Config(seed=5)
    model, optimizer, generator = fresh(5)
    train(model, optimizer, generator, steps)
    uninterrupted = model.state_dict()

    model, optimizer, generator = fresh(5)
    train(model, optimizer, generator, steps // 2)
    state = training_state(
        model,
        optimizer,
        cfg,
        epoch=0,
        step=steps // 2,
        best_metric=None,
        vocabulary=["<unk>"],
        data_generator=generator,
    )
    save_checkpoint(tmp_path / "half.pt", state)
    torch.manual_seed(1234)  # the resumed process starts from another RNG state

    model, optimizer, generator = fresh(99)
    counters = restore_training_state(
        load_checkpoint(tmp_path / "half.pt"), model, optimizer, data_generator=generator
    )
    train(model, optimizer, generator, steps, start=counters["step"])
    for key, value in uninterrupted.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Guards the test above: it must be sensitive to the restored RNG state."""
    model, optimizer, generator = fresh(5)
    train(model, optimizer, generator, 10)
    reference = model.state_dict()["0.weight"].clone()
    model, optimizer, generator = fresh(5)
    train(model, optimizer, generator, 5)
    torch.manual_seed(1234)
    train(model, optimizer, generator, 10, start=5)
    assert not torch.equal(model.state_dict()["0.weight"], reference)


def test_restore_refuses_a_plain_state_dict(tmp_path):
    model, optimizer, _ = fresh(0)
    with pytest.raises(InputError, match="not a training checkpoint: missing"):
        restore_training_state({"model": model.state_dict()}, model, optimizer)


def half_trained_state(with_scheduler: bool, with_generator: bool) -> dict:
    model, optimizer, generator = fresh(3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2) if with_scheduler else None
    return training_state(
        model,
        optimizer,
        Config(seed=3),
        epoch=0,
        step=0,
        best_metric=None,
        scheduler=scheduler,
        data_generator=generator if with_generator else None,
    )


@pytest.mark.parametrize(
    ("saved", "live", "message"),
    [
        ("scheduler", "", "holds scheduler state but this run has no scheduler"),
        ("", "scheduler", "holds no scheduler state but this run has a scheduler"),
        ("data_generator", "", "holds data_generator state but this run has no data_generator"),
        ("", "data_generator", "holds no data_generator state but this run has a data_generator"),
    ],
)
def test_state_missing_on_either_side_is_an_error_unless_allowed(saved, live, message):
    state = half_trained_state(with_scheduler=saved == "scheduler", with_generator=saved == "data_generator")
    model, optimizer, generator = fresh(3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2) if live == "scheduler" else None
    live_generator = generator if live == "data_generator" else None
    with pytest.raises(InputError, match=message):
        restore_training_state(state, model, optimizer, scheduler=scheduler, data_generator=live_generator)
    counters = restore_training_state(
        state,
        model,
        optimizer,
        scheduler=scheduler,
        data_generator=live_generator,
        allow_missing={saved or live},
    )
    assert counters["step"] == 0


def test_scheduler_state_is_restored():
    model, optimizer, _ = fresh(3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = training_state(
        model, optimizer, Config(seed=3), epoch=0, step=3, best_metric=None, scheduler=scheduler
    )
    model, optimizer, _ = fresh(3)
    resumed = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    restore_training_state(state, model, optimizer, scheduler=resumed)
    assert resumed.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
