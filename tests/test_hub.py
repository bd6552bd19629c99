"""Sharing runs: the model card, ``usae push --dry-run``, and ``hf://`` runs loaded through
the real ``huggingface_hub`` client (from a stand-in Hub on 127.0.0.1, then offline from the
cache it laid out). The upload itself (``HfApi.create_repo``/``upload_file``) needs the
network and an account; it is a thin call, not tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from usae.cli import main
from usae.errors import UsaeError
from usae.hub import model_card, parse_hub_run, push



def test_model_card_from_a_real_eval_report(quick_demo):
    card = model_card(quick_demo / "run", quick_demo / "eval", "me/usae-demo")
    report = json.loads((quick_demo / "eval" / "report.json").read_text())
    assert card.startswith("---\nlibrary_name: usae")
    for m in report["models"]:
        assert f"| {m} |" in card  # models table, R² rows, L0 rows
    assert f"{report['r2'][0][1]:.3f}" in card  # a cross-model cell
    assert "effnet:lite0" in card and "_blocks." in card and "7x7" in card  # spec, layer, grid
    assert "images from 'images'" in card  # the store's source, without a machine path
    assert "preset `fast`" in card and 'UniversalSAE.load("hf://me/usae-demo")' in card
    assert str(quick_demo) not in card
    classes = report["concept_classes"]
    assert f"{classes['universal']} universal" in card


def test_push_dry_run_writes_the_card_and_lists_files(quick_demo, capsys):
    assert main(["push", str(quick_demo / "run"), "me/usae-demo", "--eval",
                 str(quick_demo / "eval"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "eval/report.json", "eval/concepts.csv",
                 "README.md"):
        assert name in out
    assert (quick_demo / "run" / "README.md").read_text().startswith("---")


def test_push_refuses_bad_input(quick_demo, tmp_path):
    with pytest.raises(UsaeError, match="OWNER/NAME"):
        push(quick_demo / "run", "no-slash", dry_run=True)
    with pytest.raises(UsaeError, match="lacks report.json"):
        push(quick_demo / "run", "me/x", eval_dir=tmp_path, dry_run=True)
    with pytest.raises(UsaeError, match="not a Hub run"):
        parse_hub_run("hf://only-a-name")
    assert parse_hub_run("hf://me/x@v1") == ("me/x", "v1")


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.slow
def test_hf_runs_load_through_the_hub_cache_then_offline(quick_demo, tmp_path):
    """First through the client from a stand-in Hub on 127.0.0.1 (the client lays out its
    own cache in HF_HOME); then, with the Hub gone and HF_HUB_OFFLINE=1, from that cache."""
    from tests.conftest import stand_in_hub

    code = ("from usae import UniversalSAE; s = UniversalSAE.load('hf://me/demo'); "
            "print(s.models, s.cfg.n)")
    with stand_in_hub(quick_demo / "run", "me/demo", tmp_path) as env:
        online = _python(code, env)
        assert online.returncode == 0, online.stderr
    snapshots = list((tmp_path / "hf" / "hub" / "models--me--demo" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").exists()
    offline = _python(code, {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout == online.stdout, offline.stderr
    # every command takes hf:// runs: encode through the CLI, offline
    import numpy as np

    x = np.zeros((3, 320), np.float32)
    np.save(tmp_path / "x.npy", x)
    cli = subprocess.run([sys.executable, "-m", "usae", "encode", "hf://me/demo", "--model",
                          "effnet_lite0", "--input", str(tmp_path / "x.npy"), "--out",
                          str(tmp_path / "z.npy")], capture_output=True, text=True, timeout=120,
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr
    assert np.load(tmp_path / "z.npy").shape[0] == 3


@pytest.mark.slow
def test_an_uncached_hf_run_offline_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "usae", "encode", "hf://me/missing", "--model",
                        "a", "--input", "x.npy", "--out", "z.npy"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set and it is not in the local Hub " \
        "cache" in r.stderr
    assert r.stderr.count("\n") == 1
