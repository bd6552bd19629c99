"""usae.sae.loggers: the optional TensorBoard and W&B sinks, against recording stand-ins for
the two libraries (neither is a dependency; the real ones need no account offline)."""

from __future__ import annotations

import sys
import types

import pytest

from usae.errors import UsaeError
from usae.sae.loggers import MetricSinks


class Recorder:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.calls = args, kwargs, []

    def add_scalar(self, key, value, step):
        self.calls.append(("scalar", key, value, step))

    def log(self, scalars, step):
        self.calls.append(("log", dict(scalars), step))

    def close(self):
        self.calls.append(("close",))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_libs(monkeypatch):
    made = {"tb": [], "wandb": []}

    def summary_writer(*args, **kwargs):
        made["tb"].append(Recorder(*args, **kwargs))
        return made["tb"][-1]

    def init(**kwargs):
        made["wandb"].append(Recorder(**kwargs))
        return made["wandb"][-1]

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = summary_writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    wandb = types.ModuleType("wandb")
    wandb.init = init
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return made


ROW = {"step": 7, "loss": 0.5, "lr": 1e-3, "dead": 3, "finite": True, "model": "a",
       "per_model": [1.0, 2.0]}


def test_no_sink_does_nothing(tmp_path, fake_libs):
    sinks = MetricSinks(tmp_path, tensorboard=False, wandb=False, config={})
    sinks.log(ROW)
    sinks.close()
    assert fake_libs == {"tb": [], "wandb": []}


def test_tensorboard_gets_every_numeric_scalar_at_its_step(tmp_path, fake_libs):
    sinks = MetricSinks(tmp_path, tensorboard=True, wandb=False, config={"k": 4})
    (writer,) = fake_libs["tb"]
    assert writer.args == (str(tmp_path / "tb"),) and not fake_libs["wandb"]
    sinks.log(ROW)
    assert writer.calls == [("scalar", "step", 7, 7), ("scalar", "loss", 0.5, 7),
                            ("scalar", "lr", 1e-3, 7), ("scalar", "dead", 3, 7)]
    sinks.close()
    assert writer.calls[-1] == ("close",)
    sinks.close()  # a second close: nothing left to close
    assert writer.calls.count(("close",)) == 1


def test_wandb_runs_offline_in_the_run_folder(tmp_path, fake_libs, monkeypatch):
    sinks = MetricSinks(tmp_path, tensorboard=False, wandb=True, config={"k": 4})
    (run,) = fake_libs["wandb"]
    assert run.kwargs == {"project": "usae", "dir": str(tmp_path), "config": {"k": 4},
                          "mode": "offline"}
    sinks.log(ROW)
    assert run.calls == [("log", {"step": 7, "loss": 0.5, "lr": 1e-3, "dead": 3}, 7)]
    sinks.close()
    assert run.calls[-1] == ("finish",)
    monkeypatch.setenv("WANDB_MODE", "online")
    MetricSinks(tmp_path, tensorboard=False, wandb=True, config={})
    assert fake_libs["wandb"][-1].kwargs["mode"] == "online"


def test_both_sinks_get_the_same_rows(tmp_path, fake_libs):
    sinks = MetricSinks(tmp_path, tensorboard=True, wandb=True, config={})
    sinks.log({"step": 1, "loss": 2.0})
    sinks.close()
    assert fake_libs["tb"][0].calls == [("scalar", "step", 1, 1), ("scalar", "loss", 2.0, 1),
                                        ("close",)]
    assert fake_libs["wandb"][0].calls == [("log", {"step": 1, "loss": 2.0}, 1), ("finish",)]


@pytest.mark.parametrize("flag, module, package", [
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")])
def test_a_missing_library_says_what_to_install(tmp_path, monkeypatch, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(UsaeError) as info:
        MetricSinks(tmp_path, tensorboard=flag == "tensorboard", wandb=flag == "wandb",
                    config={})
    assert str(info.value) == f"{flag}=true needs `pip install {package}`"
