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


def _card_table(card: str, header: str) -> list[list[str]]:
    """The body rows of the card's markdown table whose header line starts with ``header``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _card_header(card: str, header: str) -> list[str]:
    line = next(line for line in card.splitlines() if line.startswith(header))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_model_cards_tables_equal_the_report_and_config_cell_by_cell(quick_demo):
    import re

    card = model_card(quick_demo / "run", quick_demo / "eval", "me/usae-demo")
    report = json.loads((quick_demo / "eval" / "report.json").read_text())
    cfg = json.loads((quick_demo / "run" / "config.json").read_text())
    models = report["models"]
    r2 = _card_table(card, "| encoded \\ decoded |")
    assert [row[0] for row in r2] == models
    assert _card_header(card, "| encoded \\ decoded |") == ["encoded \\ decoded", *models]
    assert _card_header(card, "| source \\ target |") == ["source \\ target",
                                                           *report["faithfulness"]["models"]]
    assert f"On {report['faithfulness']['n_images']} images: the reconstruction is spliced" \
        in card
    for i, row in enumerate(r2):  # row = encoded from, column = decoded into, as the report
        assert [float(c) for c in row[1:]] == pytest.approx(report["r2"][i], abs=5e-4)
    per_model = _card_table(card, "| model | L0")
    assert [row[0] for row in per_model] == models
    for row, m in zip(per_model, models):
        assert float(row[1]) == pytest.approx(report["l0"][m], abs=0.05)
        assert float(row[2]) == pytest.approx(report["dead_fraction"][m], abs=5e-4)
    f = report["faithfulness"]
    faith = _card_table(card, "| source \\ target |")
    assert [row[0] for row in faith] == f["models"]
    for i, row in enumerate(faith):
        for j, cell in enumerate(row[1:]):
            agree, recovered = re.fullmatch(r"([\d.]+) % / ([-\d.]+)", cell).groups()
            assert float(agree) == pytest.approx(100 * f["top1_agreement"][i][j], abs=0.05)
            assert float(recovered) == pytest.approx(f["kl_recovered"][i][j], abs=5e-4)
    assert (f"On the `{report['split']}` split ({report['n_images']} images, "
            f"{report['n_tokens']:,} tokens)") in card
    classes = report["concept_classes"]
    said = re.search(r"Concept classes \(by firing entropy\): (\d+) universal, model-specific: "
                     r"(.*), (\d+) never fire\.", card)
    assert int(said.group(1)) == classes["universal"]
    assert int(said.group(3)) == classes["never_fire"]
    assert dict(p.rsplit(" ", 1) for p in said.group(2).split(", ")) == {
        m: str(n) for m, n in classes["model_specific"].items()}
    sae, train = cfg["sae"], cfg["train"]
    n = sae["n_concepts"] or 8 * max(sae["dims"])
    assert sae["sparsity"] == "energy"  # the demo's `fast`: k is a ceiling, and says so
    assert (f"n = {n} concepts, at most k = {sae['k']} active per token (sparsity rule "
            f"`energy`: the fewest of the k largest carrying "
            f"{round(100 * sae['energy_fraction'])}% of their squared sum), encoder "
            f"`{sae['encoder']}`") in card
    assert f"lr {train['lr']}, batch {train['batch_images']} images" in card
    assert f"trained {cfg['status']['step']} steps" in card


def test_the_card_says_how_many_concepts_each_sparsity_rule_keeps():
    from usae.config import SAEConfig
    from usae.hub import _sparsity_words

    def words(**keys):
        return _sparsity_words(SAEConfig(models=("a",), dims=(4,), k=8, **keys))

    assert words() == "k = 8 active per token (sparsity rule `topk`)"
    assert words(sparsity="batchtopk") == ("k = 8 active per token on average (sparsity rule "
                                           "`batchtopk`)")
    assert words(sparsity="energy", energy_fraction=0.75).startswith(
        "at most k = 8 active per token (sparsity rule `energy`: the fewest of the k largest "
        "carrying 75% of")


def test_the_card_is_a_hub_card_whose_sections_read_in_order_and_whose_code_runs(quick_demo,
                                                                                 monkeypatch):
    """Oracles outside the card's code: YAML for the Hub metadata, a Markdown parser for the
    sections and the code block, and the block itself executed against the run (its shape
    comments are checked against what it returns)."""
    import re

    import torch
    import yaml
    from markdown_it import MarkdownIt

    import usae
    from usae.sae.model import UniversalSAE

    card = model_card(quick_demo / "run", quick_demo / "eval", "me/usae-demo")
    cfg = json.loads((quick_demo / "run" / "config.json").read_text())
    models, dims = cfg["sae"]["models"], cfg["sae"]["dims"]
    n = cfg["sae"]["n_concepts"] or 8 * max(dims)
    head, front, body = card.split("---\n", 2)
    assert head == "" and yaml.safe_load(front) == {
        "library_name": "usae",
        "tags": ["sparse-autoencoder", "interpretability", "universal-sparse-autoencoder"]}
    tokens = MarkdownIt().enable("table").parse(body)
    headings = [(t.tag, tokens[i + 1].content) for i, t in enumerate(tokens)
                if t.type == "heading_open"]
    assert headings == [("h1", "Universal sparse autoencoder: " + ", ".join(models)),
                        ("h2", "Models and data"), ("h2", "Configuration"),
                        ("h2", "Evaluation"),
                        ("h3", "Faithfulness through each model's own head"),
                        ("h2", "How to load it")]
    assert sum(t.type == "table_open" for t in tokens) == 4  # models, R², per model, faith
    code = [t for t in tokens if t.type == "fence"]
    assert len(code) == 1 and code[0].info == "python"
    loaded, real_load = [], UniversalSAE.load

    def load_the_run(path):
        loaded.append(path)
        return real_load(quick_demo / "run")

    monkeypatch.setattr(usae.UniversalSAE, "load", staticmethod(load_the_run))
    scope = {"acts": torch.randn(5, dims[0])}
    exec(compile(code[0].content, "card", "exec"), scope)
    assert loaded == ["hf://me/usae-demo"]
    assert tuple(scope["codes"].shape) == (5, n) and tuple(scope["x"].shape) == (5, dims[-1])
    said = re.search(r'encode\("(\w+)", acts\)\s+# \(N, (\d+)\) raw activations -> \(N, '
                     r'(\d+)\) codes', code[0].content)
    assert said.groups() == (models[0], str(dims[0]), str(n))
    said = re.search(r'decode\("(\w+)", codes\)\s+# -> \(N, (\d+)\)', code[0].content)
    assert said.groups() == (models[-1], str(dims[-1]))
    assert f"Written by usae {usae.__version__}." in card
    assert "usae eval hf://me/usae-demo --store STORE --out EVAL" in card


# ---- a card and a push on runs made here -------------------------------------------------
def _tiny_run(root, edit=None, **overrides):
    """A finished run of three models of different widths (4, 6, 8), 16 concepts, whose
    config.json ``edit`` may change; no store record, as for an imported run."""
    from usae.config import resolve
    from usae.sae.model import UniversalSAE

    cfg = resolve(("a", "b", "c"), (4, 6, 8), "paper", {"n_concepts": 16, "k": 2, **overrides})
    run = root / "run"
    UniversalSAE(cfg.sae).save(run, cfg)
    if edit is not None:
        obj = json.loads((run / "config.json").read_text())
        edit(obj)
        (run / "config.json").write_text(json.dumps(obj))
    return run


def test_a_card_without_records_says_what_is_missing(tmp_path):
    from markdown_it import MarkdownIt

    run = _tiny_run(tmp_path, edit=lambda c: c.pop("status"))
    card = model_card(run)
    assert _card_table(card, "| model | d |") == [
        ["a", "4", "`?`", "`?`", "?"], ["b", "6", "`?`", "`?`", "?"],
        ["c", "8", "`?`", "`?`", "?"]]
    assert "Training images: not recorded. Store content hash: `not recorded`." in card
    assert "\n## Evaluation\n\nNo evaluation was shared with this run.\n\n## How" in card
    assert "- trained ? steps (final)\n" in card  # a run without a status is a final run
    code = [t for t in MarkdownIt().parse(card) if t.type == "fence"][0].content
    assert 'UniversalSAE.load("hf://OWNER/NAME")' in code  # the default repo id
    assert 'encode("a", acts)   # (N, 4) raw activations -> (N, 16) codes' in code
    assert 'decode("c", codes)     # -> (N, 8) in that model' in code
    assert card.endswith("Written by usae " + __import__("usae").__version__ + ".\n")
    headings = [t.tag for t in MarkdownIt().parse(card) if t.type == "heading_open"]
    assert headings == ["h1", "h2", "h2", "h2", "h2"]  # no faithfulness without an eval


def test_the_card_says_a_partial_runs_step_and_state(tmp_path):
    run = _tiny_run(tmp_path, edit=lambda c: c.update(status={"state": "partial", "step": 7}))
    assert "- trained 7 steps (partial)\n" in model_card(run)


def test_the_card_records_store_fields_where_the_store_has_them(tmp_path):
    store = {"source_description": "12 images from 'x'", "content_hash": "abc",
             "models": {"b": {"spec": "timm:vit", "layer": "blocks.3",
                              "aligned_grid": [2, 3]}}}
    card = model_card(_tiny_run(tmp_path, edit=lambda c: c.update(store=store)))
    rows = _card_table(card, "| model | d |")
    assert rows[1] == ["b", "6", "`timm:vit`", "`blocks.3`", "2x3"]
    assert rows[0] == ["a", "4", "`?`", "`?`", "?"]  # a model the store did not record
    assert "Training images: 12 images from 'x'. Store content hash: `abc`." in card


def test_the_card_lists_matryoshka_prefixes_and_where_an_extended_run_came_from(tmp_path):
    import re

    ext = {"run": "old-run", "step": 40, "added": ["b", "c"], "at": "2026-11-02T10:00:00"}
    card = model_card(_tiny_run(tmp_path, edit=lambda c: c.update(extended_from=ext),
                                matryoshka=(4, 8)))
    config = card.split("## Configuration\n\n")[1].split("\n\n")[0].splitlines()
    assert config[1] == "- Matryoshka prefixes 4, 8"
    said = re.fullmatch(r"- extended from `(.*)` \(step (\d+)\): added (.*) on (\S+), the "
                        r"earlier models' weights frozen", config[3])
    assert said.groups() == ("old-run", "40", "`b`, `c`", "2026-11-02")
    finetuned = {**ext, "finetune": True}
    card = model_card(_tiny_run(tmp_path / "f", edit=lambda c: c.update(
        extended_from=finetuned)))
    config = card.split("## Configuration\n\n")[1].split("\n\n")[0].splitlines()
    assert "Matryoshka" not in card and len(config) == 4
    said = re.fullmatch(r"- fine-tuned from `(.*)` \(step (\d+)\) on (\S+): every model "
                        r"trained \(concept_drift.json\)", config[2])
    assert said.groups() == ("old-run", "40", "2026-11-02")
    # an older record without a date or the added models still makes a card
    from usae.hub import _extension_lines

    assert _extension_lines({"run": "r", "step": 3}) == [
        "- extended from `r` (step 3): added  on ?, the earlier models' weights frozen"]
    assert _extension_lines({"run": "r", "step": 3, "finetune": True}) == [
        "- fine-tuned from `r` (step 3) on ?: every model trained (concept_drift.json)"]


def test_a_faithfulness_cell_without_a_value_reads_n_a(quick_demo, tmp_path):
    import shutil

    shutil.copytree(quick_demo / "eval", tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    f = report["faithfulness"]
    f["top1_agreement"][0][1] = None
    f["kl_recovered"][1][0] = None
    f["top1_agreement"][2][2], f["kl_recovered"][2][2] = 0.5, 0.25
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    rows = _card_table(model_card(quick_demo / "run", tmp_path / "eval"),
                       "| source \\ target |")
    assert rows[0][2] == "n/a" and rows[1][1] == "n/a"
    assert rows[2][3] == "50.0 % / 0.250"
    assert sum(cell == "n/a" for row in rows for cell in row) == 2
    del report["faithfulness"]
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    card = model_card(quick_demo / "run", tmp_path / "eval")
    assert "Faithfulness" not in card and "| source \\ target |" not in card
    assert "never fire.\n\n## How to load it" in card


class _FakeHubApi:
    """Stands in for ``huggingface_hub.HfApi``: records what would reach the Hub."""

    calls: list = []
    fail: str | None = None

    def create_repo(self, repo_id, **kwargs):
        if self.fail:
            raise RuntimeError(self.fail)
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs))


@pytest.fixture
def shared_run(quick_demo, tmp_path, monkeypatch):
    """A copy of the quick demo's run and eval, and the Hub client replaced by a recorder."""
    import shutil

    import huggingface_hub

    shutil.copytree(quick_demo / "run", tmp_path / "run")
    shutil.copytree(quick_demo / "eval", tmp_path / "eval")
    (tmp_path / "run" / "README.md").unlink(missing_ok=True)
    monkeypatch.setattr(_FakeHubApi, "calls", [])
    monkeypatch.setattr(_FakeHubApi, "fail", None)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHubApi)
    return tmp_path


def test_push_uploads_exactly_the_planned_files_under_their_names(shared_run):
    from usae.hub import describe_plan

    run, ev = shared_run / "run", shared_run / "eval"
    plan = push(run, "me/x", eval_dir=ev, private=True)
    expected = {"config.json": run / "config.json",
                "model.safetensors": run / "model.safetensors",
                "eval/report.json": ev / "report.json", "eval/concepts.csv": ev / "concepts.csv",
                "README.md": run / "README.md"}
    assert plan == {"repo_id": "me/x", "private": True, "card": str(run / "README.md"),
                    "files": {k: str(v) for k, v in expected.items()},
                    "url": "https://huggingface.co/me/x"}
    calls = _FakeHubApi.calls
    assert calls[0] == ("create_repo", "me/x", {"private": True, "exist_ok": True})
    uploads = {c[1]["path_in_repo"]: c[1] for c in calls[1:]}
    assert len(calls) == 1 + len(expected) and set(uploads) == set(expected)
    for name, kwargs in uploads.items():
        assert kwargs == {"path_or_fileobj": str(expected[name]), "path_in_repo": name,
                          "repo_id": "me/x", "commit_message": f"usae push: {name}"}
    # the card uploaded is the one for this repo, with the eval's tables in it
    card = (run / "README.md").read_text()
    assert 'UniversalSAE.load("hf://me/x")' in card and "| encoded \\ decoded |" in card
    lines = describe_plan(plan).splitlines()
    assert lines[0] == "uploaded to me/x (private):"
    assert lines[1:-2] == [f"  {k}  <-  {v}" for k, v in expected.items()]
    assert lines[-2] == f"model card: {run / 'README.md'}"
    assert json.loads(lines[-1]) == {"url": "https://huggingface.co/me/x"}


def test_push_defaults_are_public_and_real_and_a_dry_run_never_calls_the_hub(shared_run):
    from usae.hub import describe_plan

    run = shared_run / "run"
    plan = push(run, "me/x")
    assert plan["private"] is False and plan["url"] == "https://huggingface.co/me/x"
    assert _FakeHubApi.calls[0] == ("create_repo", "me/x", {"private": False, "exist_ok": True})
    assert set(plan["files"]) == {"config.json", "model.safetensors", "README.md"}
    _FakeHubApi.calls.clear()
    plan = push(run, "me/y", dry_run=True)
    assert _FakeHubApi.calls == [] and "url" not in plan
    text = describe_plan(plan)
    assert text.splitlines()[0] == "would upload to me/y:"
    assert text.splitlines()[-1] == f"model card: {run / 'README.md'}"
    assert "{" not in text  # no url line before an upload


def test_a_failed_upload_is_one_line_that_says_what_to_check(shared_run):
    _FakeHubApi.fail = "403 Forbidden: no write access\nlong trace"
    with pytest.raises(UsaeError) as err:
        push(shared_run / "run", "me/x")
    assert str(err.value) == ("uploading to me/x failed: 403 Forbidden: no write access — "
                              "check `huggingface-cli login` and the network")


def test_push_replaces_only_a_card_it_wrote_unless_forced(shared_run):
    from usae.hub import CARD_MARK

    run = shared_run / "run"
    readme = run / "README.md"
    readme.write_bytes(b"# my own notes \xff\xfe\n")  # not UTF-8 either
    with pytest.raises(UsaeError, match="was not written by usae push"):
        push(run, "me/x", dry_run=True)
    assert readme.read_bytes() == b"# my own notes \xff\xfe\n"
    push(run, "me/x", dry_run=True, force=True)
    assert CARD_MARK in readme.read_text()
    readme.write_text("old card\n" + CARD_MARK + "\n")  # one usae wrote: rewritten freely
    push(run, "me/x", dry_run=True)
    assert readme.read_text().startswith("---\nlibrary_name: usae")


def test_push_shares_an_eval_without_its_top_images(shared_run):
    (shared_run / "eval" / "top_images.safetensors").unlink()  # not uploaded, not needed
    plan = push(shared_run / "run", "me/x", eval_dir=shared_run / "eval", dry_run=True)
    assert {"eval/report.json", "eval/concepts.csv"} <= set(plan["files"])


def test_local_run_downloads_hub_runs_and_leaves_paths_alone(tmp_path, monkeypatch):
    from pathlib import Path

    import huggingface_hub

    from usae.hub import SHARED_FILES, local_run

    calls = []

    def download(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert local_run("hf://me/x@v2") == tmp_path / "snapshot"
    assert calls == [("me/x", "v2", [*SHARED_FILES, "README.md", "eval/*"])]
    assert local_run(tmp_path / "run") == tmp_path / "run" and len(calls) == 1
    assert local_run("runs/hf-like") == Path("runs/hf-like")


def test_push_needs_a_local_run_and_a_whole_eval(shared_run):
    (shared_run / "eval" / "concepts.csv").unlink()
    with pytest.raises(UsaeError, match="lacks concepts.csv"):
        push(shared_run / "run", "me/x", eval_dir=shared_run / "eval", dry_run=True)
    with pytest.raises(UsaeError, match="is already on the Hub — push takes a local run"):
        push("hf://me/run", "me/x", dry_run=True)
    assert _FakeHubApi.calls == []


@pytest.mark.parametrize("ref, parsed", [
    ("hf://me/x", ("me/x", None)), ("hf://me/x@", ("me/x", None)),
    ("hf://me/x@v1", ("me/x", "v1")), ("hf://me/x@v@w", ("me/x", "v@w")),
])
def test_hub_refs_split_at_the_first_at_sign(ref, parsed):
    from usae.hub import is_hub_run

    assert is_hub_run(ref) and parse_hub_run(ref) == parsed


@pytest.mark.parametrize("ref", ["hf://me/", "hf:///x", "hf://a/b/c", "hf://me", "hf://@v"])
def test_malformed_hub_refs_say_how_to_write_one(ref):
    with pytest.raises(UsaeError) as err:
        parse_hub_run(ref)
    assert str(err.value) == f"{ref!r} is not a Hub run — write hf://OWNER/NAME[@revision]"
