"""Sharing runs on the Hugging Face Hub: ``usae push`` and ``hf://REPO_ID[@revision]`` runs.

A shared run is the inference files (``config.json``, ``model.safetensors``), a generated
model card (``README.md``) and, when given, the eval report (``eval/report.json``,
``eval/concepts.csv``). Loading downloads them with ``huggingface_hub`` into its usual cache
and reads them exactly like a local run: safetensors and JSON, nothing unpickled.
The upload itself is a thin call into ``huggingface_hub.HfApi`` (it needs the network and an
account, so tests cover everything up to it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from usae import __version__
from usae.analysis.eval_folder import (
    CONCEPTS_FILE,
    REPORT_FILE,
    EvalReport,
    check_eval_of_run,
    read_report,
)
from usae.errors import UsaeError
from usae.files import atomic_write_text, load_safetensors
from usae.sae import run as run_folder

PREFIX = "hf://"
SHARED_FILES = (run_folder.CONFIG_FILE, run_folder.WEIGHTS_FILE)
EVAL_FILES = (REPORT_FILE, CONCEPTS_FILE)
CARD_MARK = "<!-- model card written by usae push; it is rewritten at every push -->"


def is_hub_run(run: str | Path) -> bool:
    return str(run).startswith(PREFIX)


def parse_hub_run(run: str) -> tuple[str, str | None]:
    """``hf://org/name@rev`` -> ``("org/name", "rev")``."""
    ref = str(run)[len(PREFIX):]
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UsaeError(f"{run!r} is not a Hub run — write hf://OWNER/NAME[@revision]")
    return repo, revision or None


def local_run(run: str | Path) -> Path:
    """A run folder on this machine: local paths as they are, ``hf://`` runs downloaded (or
    found in the local Hub cache)."""
    if not is_hub_run(run):
        return Path(run)
    repo, revision = parse_hub_run(str(run))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsaeError("hf:// runs need `pip install huggingface_hub` (usae[hub])") from None
    try:
        path = snapshot_download(repo, revision=revision,
                                 allow_patterns=[*SHARED_FILES, "README.md", "eval/*"])
    except Exception as err:  # noqa: BLE001 - the hub client raises many network types
        offline = any(os.environ.get(k, "") not in ("", "0")
                      for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        why = ("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set and it is not in the local "
               "Hub cache" if offline else
               "the Hub cannot be reached and it is not in the local Hub cache")
        raise UsaeError(f"cannot load {run}: {why} ({cache}; {type(err).__name__}) — connect to "
                        "the Hub once, or copy the run folder and use its path") from None
    return Path(path)


# ---- the model card ---------------------------------------------------------------------
# The card's wording lives in Markdown templates (src/usae/card/*.md, as huggingface_hub's own
# cards are templates); the code below only fills in names and numbers.
CARD_TEMPLATES = Path(__file__).with_name("card")


def _fill(template: str, **values: Any) -> str:
    """``card/<template>.md`` with its ``${field}``s filled (a field left out is an error),
    without its final newline."""
    text = (CARD_TEMPLATES / f"{template}.md").read_text(encoding="utf-8")
    return Template(text).substitute(values).rstrip("\n")


def model_card(run: str | Path, eval_dir: str | Path | None = None,
               repo_id: str = "OWNER/NAME") -> str:
    """A README.md a reader understands without the CLI: what the SAE is, its models and
    layers, data, config, held-out metrics and how to load it."""
    cfg_json = run_folder.read_run_json(run)
    cfg = run_folder.read_config(run)
    report = read_report(eval_dir) if eval_dir else None
    store = cfg_json.get("store") or {}
    s = cfg.sae
    return _fill("card", card_mark=CARD_MARK, model_list=", ".join(s.models),
                 model_rows="\n".join(_model_rows(cfg, store)),
                 source=store.get("source_description") or "not recorded",
                 content_hash=store.get("content_hash") or "not recorded",
                 config_lines="\n".join(_config_lines(cfg, cfg_json)),
                 evaluation=_evaluation(report) if report else _fill("no_evaluation"),
                 repo_id=repo_id, first_model=s.models[0], first_dim=s.dims[0], n=s.n,
                 last_model=s.models[-1], last_dim=s.dims[-1], version=__version__) + "\n"


def _model_rows(cfg, store: dict[str, Any]) -> list[str]:
    """One table row per model: width, backbone spec, layer and token grid ('?' where the
    store did not record them)."""
    models = store.get("models", {})
    rows = []
    for m, d in zip(cfg.sae.models, cfg.sae.dims):
        info = models.get(m, {})
        grid = info.get("aligned_grid")
        rows.append(f"| {m} | {d} | `{info.get('spec', '?')}` | `{info.get('layer', '?')}` | "
                    f"{'x'.join(map(str, grid)) if grid else '?'} |")
    return rows


def _config_lines(cfg, cfg_json: dict[str, Any]) -> list[str]:
    t, s = cfg.train, cfg.sae
    status = cfg_json.get("status", {})
    return [f"- preset `{cfg.preset}`; n = {s.n} concepts, {_sparsity_words(s)}, encoder "
            f"`{s.encoder}`, standardization "
            f"`{s.standardize}`, dictionary rows `{s.dictionary_norm}`",
            *([f"- Matryoshka prefixes {', '.join(map(str, t.matryoshka))}"]
              if t.matryoshka else []),
            f"- criterion `{t.criterion}`, auxiliary loss `{t.aux}` (x{t.aux_coef}), decoder "
            f"update `{t.decoder_update}`, schedule `{t.schedule}`, lr {t.lr}, batch "
            f"{t.batch_images} images",
            *_extension_lines(cfg_json.get("extended_from")),
            f"- trained {status.get('step', '?')} steps ({status.get('state', 'final')})"]


def _sparsity_words(s) -> str:
    """How many concepts a token's code keeps, as the card says it."""
    if s.sparsity == "energy":
        return (f"at most k = {s.k} active per token (sparsity rule `energy`: the fewest of "
                f"the k largest carrying {s.energy_fraction:.0%} of their squared sum)")
    if s.sparsity == "batchtopk":
        return f"k = {s.k} active per token on average (sparsity rule `batchtopk`)"
    return f"k = {s.k} active per token (sparsity rule `{s.sparsity}`)"


def _extension_lines(ext: dict[str, Any] | None) -> list[str]:
    """The card's line for a run made by ``usae train --extend``."""
    if not ext:
        return []
    if ext.get("finetune"):
        return [f"- fine-tuned from `{ext.get('run')}` (step {ext.get('step')}) on "
                f"{str(ext.get('at', '?'))[:10]}: every model trained (concept_drift.json)"]
    added = ", ".join(f"`{m}`" for m in ext.get("added", []))
    return [f"- extended from `{ext.get('run')}` (step {ext.get('step')}): added {added} on "
            f"{str(ext.get('at', '?'))[:10]}, the earlier models' weights frozen"]


def _evaluation(report: EvalReport) -> str:
    """The held-out R² matrix, L0 and dead fractions, concept classes, and faithfulness."""
    models = report.models
    r2 = np.asarray(report.r2)
    classes = report.concept_classes
    text = _fill(
        "evaluation", split=report.split, n_images=report["n_images"],
        n_tokens=f"{report['n_tokens']:,}", model_header=" | ".join(models),
        model_rule="---|" * len(models),
        r2_rows="\n".join(f"| {m} | " + " | ".join(f"{v:.3f}" for v in r2[i]) + " |"
                          for i, m in enumerate(models)),
        l0_rows="\n".join(f"| {m} | {report.l0[m]:.1f} | {report.dead_fraction[m]:.3f} |"
                          for m in models),
        universal=classes["universal"], never_fire=classes["never_fire"],
        specific=", ".join(f"{m} {n}" for m, n in classes["model_specific"].items()))
    faithfulness = _faithfulness(report.faithfulness)
    return text + ("\n\n" + faithfulness if faithfulness else "")


def _faithfulness(f: dict[str, Any] | None) -> str:
    """Each cell: top-1 agreement and fraction of KL recovered over the mean ablation, when a
    source model's code is decoded into the target model and run through its own head ('' when
    the report has none)."""
    if not f or "top1_agreement" not in f:
        return ""
    models = f["models"]

    def cell(i: int, j: int) -> str:
        a, r = f["top1_agreement"][i][j], f["kl_recovered"][i][j]
        return "n/a" if a is None or r is None else f"{100 * a:.1f} % / {r:.3f}"

    rows = [f"| {m} | " + " | ".join(cell(i, j) for j in range(len(models))) + " |"
            for i, m in enumerate(models)]
    return _fill("faithfulness", n_images=f["n_images"], model_header=" | ".join(models),
                 model_rule="---|" * len(models), rows="\n".join(rows))


# ---- push ---------------------------------------------------------------------------------
def _check_weights_load(run: Path) -> None:
    """The weights file reads whole (a truncated or corrupt file is never sent)."""
    try:
        load_safetensors(run / run_folder.WEIGHTS_FILE)
    except UsaeError as err:
        raise UsaeError(f"{run} cannot be shared: {err}") from None


def push(run: str | Path, repo_id: str, eval_dir: str | Path | None = None,
         private: bool = False, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Upload a run's inference files, model card and eval report; with ``dry_run`` write the
    card to ``RUN/README.md`` and only list what would be uploaded. A ``README.md`` that usae
    did not write is replaced only with ``force``; weights that do not load are never sent."""
    if is_hub_run(run):
        raise UsaeError(f"{run} is already on the Hub — push takes a local run folder")
    run = Path(run)
    if repo_id.count("/") != 1:
        raise UsaeError(f"REPO_ID must look like OWNER/NAME, got {repo_id!r}")
    if not run_folder.is_final(run):
        raise UsaeError(f"{run} is not a finished run (see its config.json status) — finish it "
                        "with `usae train --resume` first")
    files = {name: run / name for name in SHARED_FILES}
    for name, path in files.items():
        if not path.exists():
            raise UsaeError(f"{run} lacks {name}; only finished runs can be shared")
    _check_weights_load(run)
    if eval_dir is not None:
        cfg = run_folder.read_config(run)
        check_eval_of_run(eval_dir, run, list(cfg.sae.models), cfg.sae.n, need=EVAL_FILES)
        files.update({f"eval/{name}": Path(eval_dir) / name for name in EVAL_FILES})
    card = run / "README.md"
    if card.exists() and CARD_MARK not in card.read_text(errors="replace") and not force:
        raise UsaeError(f"{card} was not written by usae push — move it away, or pass --force "
                        "to replace it with the generated model card")
    atomic_write_text(card, model_card(run, eval_dir, repo_id))
    files["README.md"] = card
    plan = {"repo_id": repo_id, "private": private,
            "files": {k: str(v) for k, v in files.items()}, "card": str(card)}
    if dry_run:
        return plan
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UsaeError("usae push needs `pip install huggingface_hub` (usae[hub])") from None
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        for path_in_repo, path in files.items():
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path_in_repo,
                            repo_id=repo_id, commit_message=f"usae push: {path_in_repo}")
    except Exception as err:  # noqa: BLE001 - network and auth errors of the hub client
        raise UsaeError(f"uploading to {repo_id} failed: {str(err).splitlines()[0]} — check "
                        "`huggingface-cli login` and the network") from None
    plan["url"] = f"https://huggingface.co/{repo_id}"
    return plan


def describe_plan(plan: dict[str, Any]) -> str:
    lines = [f"{'would upload' if 'url' not in plan else 'uploaded'} to {plan['repo_id']}"
             f"{' (private)' if plan['private'] else ''}:"]
    lines += [f"  {k}  <-  {v}" for k, v in plan["files"].items()]
    lines.append(f"model card: {plan['card']}")
    return "\n".join(lines) + ("\n" + json.dumps({"url": plan["url"]}) if "url" in plan else "")
