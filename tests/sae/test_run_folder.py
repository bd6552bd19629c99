"""The run folder (usae.sae.run), file by file: what each helper writes, reads back and
refuses, checked against the folder's bytes and listing."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import exactly
from usae.config import resolve
from usae.errors import UsaeError
from usae.sae import run as run_folder
from usae.sae.run import (
    check_run_matches_store,
    final_status,
    has_run_files,
    is_final,
    load_weights,
    partial_status,
    prepare_folder,
    read_config,
    read_run_json,
    run_status,
    save_weights,
    store_record,
    truncate_metrics,
    warn_if_partial,
    write_config,
)


def _cfg():
    return resolve(("a", "b"), (6, 4), "best", {"n_concepts": 16, "k": 2})


def test_the_run_files_are_named_as_the_layout_says():
    assert (run_folder.CONFIG_FILE, run_folder.WEIGHTS_FILE, run_folder.CHECKPOINT_FILE,
            run_folder.METRICS_FILE, run_folder.INDEPENDENT_FILE) == (
        "config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl",
        "independent.json")


def test_write_config_puts_status_last_and_extra_keys_between(tmp_path):
    cfg = _cfg()
    write_config(tmp_path, cfg, partial_status(3, 10), {"store": {"path": "/s"}})
    text = (tmp_path / "config.json").read_text()
    obj = json.loads(text)
    assert list(obj) == ["sae", "train", "preset", "store", "status"]
    assert obj["status"] == {"state": "partial", "step": 3, "total_steps": 10}
    assert obj["store"] == {"path": "/s"} and obj["preset"] == "best"
    assert read_config(tmp_path) == cfg and read_run_json(str(tmp_path)) == obj
    write_config(tmp_path, cfg, final_status(10, 10))
    assert list(json.loads((tmp_path / "config.json").read_text())) == [
        "sae", "train", "preset", "status"]


def test_statuses():
    assert final_status() == {"state": "final", "step": 0, "total_steps": 0}
    assert final_status(4, 9) == {"state": "final", "step": 4, "total_steps": 9}
    assert partial_status(4, 9) == {"state": "partial", "step": 4, "total_steps": 9}


def test_a_folder_without_config_or_with_a_broken_one_is_not_a_run(tmp_path):
    with exactly(f"{tmp_path} is not a usae run: config.json is missing"):
        read_run_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with exactly(f"{tmp_path / 'config.json'} is corrupt: expected a JSON object"):
        read_run_json(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UsaeError, match=r"^run config .*config\.json is corrupt: "):
        read_run_json(tmp_path)


@pytest.mark.parametrize("status, state, final", [
    (None, "final", True), ({"state": "partial", "step": 2}, "partial", False),
    ({"state": "final", "step": 5}, "final", True), ({"step": 5}, "final", True),
    ("done", "final", True),
])
def test_run_status_counts_runs_without_a_status_as_final(tmp_path, status, state, final):
    obj = {"sae": {}} if status is None else {"sae": {}, "status": status}
    (tmp_path / "config.json").write_text(json.dumps(obj))
    assert run_status(tmp_path)["state"] == state and is_final(tmp_path) is final
    if isinstance(status, dict) and "state" in status:
        assert run_status(tmp_path) == status
    elif status is not None:
        assert run_status(tmp_path) == final_status()


def test_is_final_is_false_without_a_config(tmp_path):
    assert is_final(tmp_path / "nowhere") is False


def test_a_partial_run_warns_with_its_step(tmp_path, caplog):
    write_config(tmp_path, _cfg(), partial_status(7, 40))
    with caplog.at_level(logging.WARNING, logger="usae.sae.run"):
        warn_if_partial(tmp_path)
    assert caplog.messages == [f"warning: {tmp_path} is a partial run: its weights are from "
                               "step 7 of 40 (training was interrupted; `usae train --resume` "
                               "finishes it)"]
    caplog.clear()
    write_config(tmp_path, _cfg(), final_status(40, 40))
    with caplog.at_level(logging.WARNING, logger="usae.sae.run"):
        warn_if_partial(tmp_path)
    assert caplog.messages == []


def test_store_record(tmp_path):
    assert store_record(tmp_path) is None  # no run at all
    write_config(tmp_path, _cfg(), final_status(), {"store": {"models": {"a": {}}}})
    assert store_record(tmp_path) == {"models": {"a": {}}}
    write_config(tmp_path, _cfg(), final_status(), {"store": "/old/path"})
    assert store_record(tmp_path) is None
    write_config(tmp_path, _cfg(), final_status())
    assert store_record(tmp_path) is None


def test_weights_round_trip(tmp_path):
    state = {"dict.a": torch.randn(4, 3), "enc.b": torch.arange(5.0)}
    save_weights(str(tmp_path), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    back = load_weights(tmp_path)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "checkpoint.safetensors",
                                  "metrics.jsonl", "independent.json"])
def test_has_run_files_sees_each_file_a_run_writes(tmp_path, name):
    assert not has_run_files(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    assert not has_run_files(str(tmp_path))
    (tmp_path / name).write_text("")
    assert has_run_files(tmp_path)


def test_prepare_folder_makes_a_new_folder_and_clears_stale_temps(tmp_path):
    out = tmp_path / "a" / "run"
    prepare_folder(out, resume=False, force=False)
    assert out.is_dir()
    (out / ".config.json.x.tmp").write_text("left by a kill")
    prepare_folder(out, resume=False, force=False)  # an empty folder (but for temps): fine
    assert list(out.iterdir()) == []


def test_prepare_folder_resume_needs_a_checkpoint(tmp_path):
    with exactly(f"--resume: {tmp_path} has no checkpoint.safetensors to resume from — train "
                "without --resume to start it"):
        prepare_folder(tmp_path, resume=True, force=False)
    (tmp_path / "checkpoint.safetensors").write_text("")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    prepare_folder(tmp_path, resume=True, force=True)  # resume wins: nothing removed
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("files, message", [
    (["thesis.tex"], "{out} exists and is not empty — pass --resume to continue it, --force to "
                     "replace it, or choose another --out"),
    (["config.json"], "{out} holds a run that was stopped before its first checkpoint — pass "
                      "--force to start it again, or choose another --out"),
    (["config.json", "checkpoint.safetensors"], "{out} holds a run — pass --resume to "
                                                 "continue it, --force to replace it, or "
                                                 "choose another --out"),
])
def test_prepare_folder_refuses_what_it_would_overwrite(tmp_path, files, message):
    out = tmp_path / "out"
    out.mkdir()
    for name in files:
        (out / name).write_text("{}")
    with exactly(message.format(out=out)):
        prepare_folder(out, resume=False, force=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # nothing touched


def test_prepare_folder_refuses_a_file_for_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with exactly(f"{tmp_path / 'file'} is a file, not a folder — choose another --out"):
        prepare_folder(tmp_path / "file", resume=False, force=False)


def test_force_removes_only_the_files_a_run_writes(tmp_path):
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl",
                 "independent.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    prepare_folder(tmp_path, resume=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["independent.json", "notes.txt"]
    (tmp_path / "config.json").write_text("{}")  # a run stopped early: some files only
    prepare_folder(tmp_path, resume=False, force=True)
    assert not (tmp_path / "config.json").exists()


def test_truncate_metrics_keeps_lines_up_to_the_checkpoint(tmp_path):
    truncate_metrics(tmp_path, 3)  # no metrics yet: nothing to do
    assert not (tmp_path / "metrics.jsonl").exists()
    lines = [{"step": 1}, {"step": 2, "loss": 0.5}, {"note": "no step"}, {"step": 3},
             {"step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    truncate_metrics(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(
        json.dumps(x) + "\n" for x in lines[:4])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    truncate_metrics(tmp_path, 9)  # a line cut by a kill: it and all after it go
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    truncate_metrics(tmp_path, 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text('{"note": "no step"}\n{"step": 1}\n')
    truncate_metrics(tmp_path, 0)  # a line without a step counts as step 0
    assert (tmp_path / "metrics.jsonl").read_text() == '{"note": "no step"}\n'


class FakeStore:
    def __init__(self, models, dims, infos=None):
        self.models, self.dims = tuple(models), tuple(dims)
        self._infos = infos or {}

    def model(self, name):
        return SimpleNamespace(info=self._infos.get(name, {}))


def test_a_store_of_other_models_or_widths_is_refused(tmp_path):
    with exactly("the run has models ['a', 'b'] but the store has ['b', 'a'] — evaluate on a "
                "store cached with the same models"):
        check_run_matches_store(tmp_path, ("a", "b"), (6, 4), FakeStore(["b", "a"], [4, 6]))
    with exactly("model 'b': the run has d=4 but the store has d=5"):
        check_run_matches_store(tmp_path, ("a", "b"), (6, 4), FakeStore(["a", "b"], [6, 5]))
    check_run_matches_store(tmp_path, ("a", "b"), (6, 4), FakeStore(["a", "b"], [6, 4]))


def test_a_store_cached_differently_from_the_runs_warns_per_key(tmp_path, caplog):
    was = {"a": {"layer": "blocks.10", "aligned_grid": [14, 14], "spec": "timm:x",
                 "keep_cls": False, "prefix_tokens": 1, "d": 6},
           "b": {"layer": "stage3", "aligned_grid": [7, 7], "prefix_tokens": 0}}
    write_config(tmp_path, _cfg(), final_status(), {"store": {"models": was}})
    now = {"a": {"layer": "blocks.11", "aligned_grid": [14, 14], "spec": "timm:y",
                 "keep_cls": True, "prefix_tokens": 1, "d": 6},
           "b": {"aligned_grid": [8, 8], "prefix_tokens": 1}}  # (no layer: not compared)
    with caplog.at_level(logging.WARNING, logger="usae.sae.run"):
        check_run_matches_store(tmp_path, ("a", "b"), (6, 4),
                                FakeStore(["a", "b"], [6, 4], now))
    assert caplog.messages == [
        "warning: model 'a' was trained with layer='blocks.10' but the store has 'blocks.11'",
        "warning: model 'a' was trained with spec='timm:x' but the store has 'timm:y'",
        "warning: model 'a' was trained with keep_cls=False but the store has True",
        "warning: model 'b' was trained with aligned_grid=[7, 7] but the store has [8, 8]",
        "warning: model 'b' was trained with prefix_tokens=0 but the store has 1"]


def test_a_model_the_record_does_not_name_is_not_compared(tmp_path, caplog):
    write_config(tmp_path, _cfg(), final_status(), {"store": {"models": {"a": {"layer": "x"}}}})
    with caplog.at_level(logging.WARNING):
        check_run_matches_store(tmp_path, ("a", "b"), (6, 4), FakeStore(
            ["a", "b"], [6, 4], {"a": {"layer": "x"}, "b": {"layer": "y"}}))
    assert caplog.messages == []


def test_a_run_without_a_store_record_is_checked_on_models_and_widths_only(tmp_path, caplog):
    write_config(tmp_path, _cfg(), final_status(), {"store": {"models": {}}})
    with caplog.at_level(logging.WARNING):
        check_run_matches_store(tmp_path, ("a", "b"), (6, 4), FakeStore(
            ["a", "b"], [6, 4], {"a": {"layer": "x"}}))
    assert caplog.messages == []
