"""Mutation testing of the core modules, one module at a time (`make mutation`).

Each core module is mutated on its own, with its own unit tests as the selection: a run over
every module with the whole suite as the selection spends its time on CLI subprocess tests
and timeouts. Each module runs in its own work folder (`mutants-work/<module>/`, a copy of
`src/`, `tests/`, `examples/` and a `pyproject.toml` whose `[tool.mutmut]` names only that
module), so runs never share mutmut's state.

Mutants listed in `scripts/mutation_equivalent.txt` (with the reason each cannot change
behaviour) are counted apart. The script prints a per-module table and writes
`mutants-work/results.json`: for each module, the mutant names by status.

Every module of ``src/usae`` can be mutated. A module without an entry in ``SELECTION`` gets
the test files that import it (``selection``). ``scripts/mutation_record.json`` (checked in)
keeps each module's last score, its date and the hash of the source it was measured on;
``--changed`` (``make mutation-changed``) runs only the modules whose source changed since,
or that have no score yet, within ``--budget`` minutes, and updates the record.

    python scripts/mutation.py                 # the 12 core modules (CORE)
    python scripts/mutation.py sae.model store.store   # some modules
    python scripts/mutation.py --rerun sae.model       # only the last run's survivors
    python scripts/mutation.py --changed --budget 30   # what changed since the record
    python scripts/mutation.py --table                 # the record as docs/TESTING.md's table
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants-work"
EQUIVALENT_FILE = ROOT / "scripts" / "mutation_equivalent.txt"
RECORD_FILE = ROOT / "scripts" / "mutation_record.json"

# `make mutation`'s default: the maths and the stores (about 42 minutes on 2 cores)
CORE = ("sae.model", "sae.step", "sae.fused", "sae.sparse", "analysis.metrics",
        "analysis.evaluate", "store.store", "store.writer", "data.sources", "store.stats",
        "data.cache", "data.align")
# module -> the tests that pin it down (fast unit tests; no browser, slow or structural tests)
SELECTION: dict[str, list[str]] = {
    "sae.model": ["tests/sae/test_sae.py", "tests/sae/test_step.py",
                  "tests/sae/test_objectives.py", "tests/analysis/test_synth.py"],
    "sae.step": ["tests/sae/test_step.py", "tests/sae/test_fused.py", "tests/sae/test_sparse.py",
             "tests/sae/test_objectives.py"],
    "sae.fused": ["tests/sae/test_fused.py", "tests/sae/test_step.py"],
    "sae.sparse": ["tests/sae/test_sparse.py", "tests/sae/test_step.py"],
    "analysis.metrics": ["tests/analysis/test_metrics.py"],
    "analysis.evaluate": ["tests/analysis/test_evaluate.py", "tests/analysis/test_controls.py"],
    "store.store": ["tests/store/test_store.py"],
    "store.writer": ["tests/store/test_store.py", "tests/data/test_cache.py"],
    "data.sources": ["tests/data/test_sources.py",
                "tests/sae/test_distributed.py::test_shards_of_a_batch_cover_it_once"],
    "store.stats": ["tests/data/test_sources.py", "tests/data/test_cache.py"],
    "data.cache": ["tests/data/test_cache.py"],
    "data.align": ["tests/data/test_images_align.py", "tests/data/test_backbones.py"],
    "sae.objectives.batch_topk": ["tests/sae/test_objectives.py"],
    "sae.extend": ["tests/sae/test_extend_checks.py", "tests/sae/test_extend.py"],
    "data.store_add": ["tests/data/test_store_add_units.py", "tests/data/test_store_add.py"],
    # (backbones whose activations are known by arithmetic; test_stream.py trains real ones)
    "data.streaming": ["tests/data/test_streaming_units.py"],
    # modules that no test imports by name: the tests of the commands that run them
    "analysis.concepts": ["tests/analysis/test_concepts.py"],
    "analysis.eval_folder": ["tests/analysis/test_eval_folder.py",
                             "tests/analysis/test_evaluate.py", "tests/cam/test_cam.py",
                             "tests/explorer/test_explorer.py"],
    "analysis.plots": ["tests/analysis/test_plots.py"],
    "analysis.truth": ["tests/analysis/test_truth.py", "tests/analysis/test_synth.py"],
    "analysis.synth": ["tests/analysis/test_synth.py"],
    # (tiny real models, each adapter against its own model; test_backbones.py builds the
    # paper's and the demo's models, too slowly to run per mutant)
    "data.backbones": ["tests/data/test_backbone_parts.py"],
    "data.backbones.base": ["tests/data/test_backbone_parts.py", "tests/data/test_adapters.py"],
    "data.backbones.hub_access": ["tests/data/test_backbone_parts.py"],
    "data.backbones.adapters": ["tests/data/test_adapters.py"],
    "data.splits": ["tests/data/test_splits.py"],
    "store.merge": ["tests/store/test_merge.py"],
    "data.images": ["tests/data/test_images.py", "tests/data/test_images_align.py"],
    "data.image_decoding": ["tests/data/test_image_decoding.py"],
    "demo": ["tests/test_demo.py"],
    "__main__": ["tests/test_package.py"],
    # the card and hf:// loading (the tests that import hub for a run's loading are slow)
    "hub": ["tests/test_hub.py"],
    "options": ["tests/test_options.py", "tests/test_config.py"],
    "config": ["tests/test_config.py", "tests/test_options.py"],
    # the CLI: every flag and argument followed into the library, and the commands end to end
    "cli": ["tests/test_cli_main.py", "tests/test_cli.py", "tests/test_options.py"],
    "commands": ["tests/test_commands.py", "tests/test_cli.py"],
    # (browser tests are left out of every selection; app.js has its own mutator, below)
    "cam.maximize": ["tests/cam/test_maximize_units.py", "tests/cam/test_cam.py"],
    "cam.spectrum": ["tests/cam/test_spectrum.py", "tests/cam/test_cam.py"],
    "explorer.build": ["tests/explorer/test_build.py", "tests/explorer/test_explorer.py"],
    "__init__": ["tests/test_package.py"],
    # small shared modules: their own unit tests (the commands that use them are slow)
    "errors": ["tests/test_package.py"],  # (classes only: nothing to mutate)
    "files": ["tests/test_files.py"],
    "locks": ["tests/test_locks.py"],
    "threads": ["tests/test_threads.py"],
    "malloc": ["tests/test_malloc_progress.py"],
    "sae.checkpoint": ["tests/sae/test_checkpoint.py"],
    "sae.run": ["tests/sae/test_run_folder.py"],
    "sae.training": ["tests/sae/test_training_entry.py"],
    "sae.trainer": ["tests/sae/test_trainer_units.py", "tests/sae/test_trainer_flow.py",
                    "tests/sae/test_train.py",
                    "tests/sae/test_objectives.py"],
    "sae.interrupts": ["tests/sae/test_interrupts.py"],
    "explorer.serve": ["tests/explorer/test_serve.py"],
    # the collectives' arithmetic on threads as ranks (test_distributed.py's torchrun is slow)
    "distributed": ["tests/test_dist_collectives.py"],
    "sae.objectives.base": ["tests/sae/test_objectives.py"],
    "progress": ["tests/test_malloc_progress.py"],
    "sae.loggers": ["tests/sae/test_loggers.py"],
    "sae.objectives.criteria": ["tests/sae/test_objectives.py", "tests/sae/test_step.py"],
    "sae.objectives.energy": ["tests/sae/test_objectives.py"],
    "sae.objectives.topk": ["tests/sae/test_objectives.py", "tests/sae/test_step.py",
                            "tests/sae/test_sparse.py", "tests/sae/test_fused.py"],
}
# module -> a test that builds the shared test artifacts (tests/conftest.py `prebuilt`) its
# tests copy instead of rebuilding per mutant. Only for a module whose code the artifacts
# never run: evaluate's `trained` run is made by the store writer and the trainer alone, so a
# mutant of evaluate cannot change it. The artifacts are built once, unmutated, before mutmut.
PREBUILT: dict[str, str] = {
    # (the cam tests' store and run: cache and train only; the explorer's inputs: cache,
    # train, eval and one CAM, all before the site is built)
    "cam.maximize": "tests/cam/test_cam.py::test_the_spectrum_is_cached_per_size",
    "cam.spectrum": "tests/cam/test_cam.py::test_the_spectrum_is_cached_per_size",
    "explorer.build": "tests/explorer/test_explorer.py::test_site_files",
    # (a run on two models and its store with a third added: cache, train and add-model)
    "sae.extend": "tests/sae/test_extend.py::test_an_extended_run_evaluates_like_any_run",
    "analysis.faithfulness":
        "tests/analysis/test_faithfulness.py::test_measure_on_two_real_backbones",
    "store.merge": "tests/store/test_merge.py::test_the_merged_rows_are_the_shards_rows_in_order",
    # (the oracle store, cached with both models at once)
    "data.store_add": "tests/data/test_store_add.py::test_store_model_is_the_manifest_entry_typed",
    # (the quick demo's eval resolves its run through hub.local_run; the hf:// tests run it)
    "hub": "tests/test_hub.py::test_model_card_from_a_real_eval_report",
    "analysis.evaluate":
        "tests/analysis/test_evaluate.py::test_report_and_csv_match_naive_formulas",
}
# module -> packages its tests import lazily, imported once by mutmut's fork server instead
# of by every mutant's process (tests/conftest.py; timm alone takes about 3 s).
PRELOAD: dict[str, str] = {"data.cache": "timm", "data.align": "timm,transformers",
                           "sae.extend": "timm", "data.store_add": "timm",
                           "analysis.faithfulness": "timm", "data.streaming": "timm",
                           "data.images": "timm", "data.image_decoding": "timm",
                           **{m: "timm,transformers" for m in (
                               "data.backbones", "data.backbones.adapters",
                               "data.backbones.base", "data.backbones.hub_access")}}
# files mutated by scripts/mutation_js.py (recorded under these names)
JS_FILES = {"explorer/static/app.js": "src/usae/explorer/static/app.js"}
PYTEST_ARGS = ["-p", "no:cacheprovider", "-q", "-m", "not browser and not slow", "-x"]
STATUS_WORDS = ("killed", "survived", "timeout", "no tests", "suspicious", "skipped",
                "segfault", "not checked", "caught by type check")


def all_modules() -> list[str]:
    """Every module of ``src/usae`` as a dotted name (``sae.step``; a package's
    ``__init__`` is the package's name), sorted."""
    names = []
    for path in sorted((ROOT / "src" / "usae").rglob("*.py")):
        parts = path.relative_to(ROOT / "src" / "usae").with_suffix("").parts
        body = ast.parse(path.read_text()).body
        if all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               for node in body):
            continue  # a docstring alone: nothing to mutate
        if parts == ("__init__",):
            names.append("__init__")  # the package's own: its version
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def has_functions(module: str) -> bool:
    """Whether the module has a function or method body that does something (what mutmut
    mutates; a Protocol's ``...`` or a docstring alone is nothing)."""
    tree = ast.parse((ROOT / module_path(module)).read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and
               not all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                       for s in node.body) for node in ast.walk(tree))


def selection(module: str) -> list[str]:
    """The tests a module's mutants run: ``SELECTION``'s, else every test file that names
    the module in an import (``usae.<module>``), without the structural and notebook tests."""
    if module in SELECTION:
        return SELECTION[module]
    parent, _, leaf = ("usae." + module).rpartition(".")
    # `from usae.sae.step import x`, `import usae.sae.step`, `from usae.sae import step`
    pattern = re.compile(rf"(from|import) {re.escape('usae.' + module)}\b|"
                         rf"from {re.escape(parent)} import [^\n]*\b{re.escape(leaf)}\b")
    skip = {"tests/test_architecture.py", "tests/test_notebook.py"}
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in skip and pattern.search(path.read_text()):
            found.append(rel)
    return found


def source_hash(module: str, root: Path = ROOT) -> str:
    """sha256 of the module's source under ``root`` (a recorded score's: its work folder's
    copy, the source the mutants were made from)."""
    return _file_hash(root / module_path(module))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_record() -> dict[str, dict]:
    return json.loads(RECORD_FILE.read_text()) if RECORD_FILE.exists() else {}


def record(module: str, entry: dict) -> None:
    """Keep a finished full run's score in the record (atomically)."""
    saved = read_record()
    c = entry["counts"]
    saved[module] = {"sha": source_hash(module, WORK / module),
                     "date": datetime.date.today().isoformat(),
                     "mutants": sum(c.values()), "killed": c.get("killed", 0) +
                     c.get("timeout", 0), "equivalent": len(entry["equivalent"]),
                     "live": len(entry["live_survivors"]), "no_tests": c.get("no tests", 0),
                     "score": entry["score"], "seconds": entry["seconds"]}
    tmp = RECORD_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RECORD_FILE)


def changed_modules() -> list[str]:
    """Modules whose source differs from the recorded run's, then those never recorded;
    the quickest recorded first."""
    saved = read_record()
    stale = [m for m in all_modules() if m in saved and saved[m]["sha"] != source_hash(m)]
    new = [m for m in all_modules() if m not in saved]
    return sorted(stale, key=lambda m: saved[m].get("seconds") or 0) + new


def table() -> str:
    """The record as a markdown table (docs/TESTING.md)."""
    saved = read_record()
    rows = ["| module | mutants | killed | equivalent | live survivors | score | date |",
            "|---|---|---|---|---|---|---|"]
    for m in [*all_modules(), *JS_FILES]:
        e = saved.get(m)
        if e is None:
            rows.append(f"| {m} | | | | | not run | |")
            continue
        stale = "" if e["sha"] == _hash_of(m) else " (source changed since)"
        rows.append(f"| {m} | {e['mutants']} | {e['killed']} | {e['equivalent']} | {e['live']} "
                    f"| **{e['score']:.1%}** | {e['date']}{stale} |")
    return "\n".join(rows)


def _hash_of(name: str) -> str:
    """A recorded name's source hash: a module's, or a JavaScript file's (JS_FILES)."""
    if name in JS_FILES:
        return _file_hash(ROOT / JS_FILES[name])
    return source_hash(name)


def equivalent_mutants() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour, from `mutation_equivalent.txt`. (An
    app.js name may hold spaces inside its quoted strings: ``app.js:3:1:"a b">"XXa bXX"``.)"""
    out: dict[str, str] = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            js = JS_NAME.match(line)
            name, why = (js.group(1), js.group(2)) if js else line.partition(" ")[::2]
            out[name] = why.strip()
    return out


# app.js:LINE:COL:ORIGINAL>MUTATION, each side a quoted string or a token without spaces
JS_NAME = re.compile(r'^(app\.js:\d+:\d+:(?:"[^"]*"|\'[^\']*\'|[^\s"\']+?)>'
                     r'(?:"[^"]*"|\'[^\']*\'|\S+)) (.*)$')


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def module_path(module: str) -> Path:
    """``sae.step`` -> src/usae/sae/step.py; a package (``sae.objectives``) -> its
    ``__init__.py``."""
    base = Path("src") / "usae" / module.replace(".", "/")
    return base / "__init__.py" if (ROOT / base).is_dir() else base.with_suffix(".py")


def prepare(module: str) -> Path:
    """A fresh work folder for `module`: sources, tests and a one-module mutmut config."""
    work = WORK / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("src", "tests", "examples"):
        shutil.copytree(ROOT / name, work / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_config(work, module)
    return work


def write_config(work: Path, module: str) -> None:
    """The work folder's pyproject.toml: the project's, with a one-module mutmut table and
    the module's current test selection."""
    text = (ROOT / "pyproject.toml").read_text()
    head = re.split(r"^\[tool\.mutmut\]", text, flags=re.M)[0]  # a table of its own is replaced
    config = "\n".join([
        "[tool.mutmut]",
        'source_paths = ["src/"]',
        f'only_mutate = ["{module_path(module)}"]',
        f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}",
        f"pytest_add_cli_args_test_selection = {_toml_list(selection(module))}",
        'also_copy = ["examples/"]',
        "mutate_only_covered_lines = true",
        # fork straight from a process that has run torch deadlocks in the OpenMP pool
        'process_isolation = "forkserver"',
        "",
    ])
    (work / "pyproject.toml").write_text(head + config)
    import tomllib

    written = tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert written["only_mutate"] == [str(module_path(module))], written  # one module only


def refresh_tests(module: str) -> Path:
    """Copy the current tests, and every source file but the mutated module's, into an
    existing work folder (for `--rerun`: new tests may need other modules' new code). The
    mutated module itself must be unchanged since its run, or its mutants' names are stale."""
    work = WORK / module
    mutated = module_path(module)
    if (ROOT / mutated).read_bytes() != (work / mutated).read_bytes():
        sys.exit(f"{mutated} changed since its run: run `{module}` again in full")
    for target in (work / "tests", work / "mutants" / "tests"):
        if target.exists():
            shutil.rmtree(target)
            shutil.copytree(ROOT / "tests", target, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (work, work / "mutants"):
        for path in (ROOT / "src").rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel != mutated and (folder / rel).parent.exists():
                shutil.copy2(path, folder / rel)
    write_config(work, module)  # (a selection that grew since the run applies)
    return work


def results(work: Path, mutmut: str) -> dict[str, str]:
    """Mutant name -> status, from `mutmut results --all true`."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    status: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, word = line.strip().rpartition(": ")
        if sep and word in STATUS_WORDS:
            status[name] = word
    return status


def _collected(module: str, status: dict[str, str], saved_path: Path) -> dict[str, str]:
    """What `--collect` reads, completed: after a `--rerun`, mutmut says "not checked" for
    the mutants it did not re-run, whose status is the one the last results kept."""
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    previous = saved.get(module, {}).get("status", {})
    return {n: previous.get(n, s) if s == "not checked" else s for n, s in status.items()}


def _env(module: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # mutants run side by side
    for name in ("PYTHONPATH", "USAE_TEST_ARTIFACTS", "USAE_TEST_ARTIFACTS_WRITE",
                 "USAE_TEST_ORDER", "USAE_TEST_PRELOAD", "USAE_MUTATION_MODULE"):
        env.pop(name, None)
    if module in PREBUILT:
        env["USAE_TEST_ARTIFACTS"] = str(WORK / module / "artifacts")
    if module in PRELOAD:
        env["USAE_TEST_PRELOAD"] = PRELOAD[module]
    if module:  # fixtures that run the module's code become per-test (conftest)
        env["USAE_MUTATION_MODULE"] = module
    if module:  # conftest runs a mutant's fastest tests first (it stops at the first failure)
        env["USAE_TEST_ORDER"] = str(WORK / module / "mutants" / "mutmut-stats.json")
    return env


def prebuild(module: str) -> None:
    """Build the module's shared test artifacts with the unmutated code (see PREBUILT)."""
    if module not in PREBUILT:
        return
    folder = WORK / module / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(_env(module), USAE_TEST_ARTIFACTS_WRITE="1")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    PREBUILT[module]], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def run_module(module: str, mutmut: str, max_children: int, rerun: bool) -> dict[str, str]:
    """Run mutmut on one module; returns mutant name -> status."""
    if rerun:
        work = refresh_tests(module)
        prebuild(module)
        previous = json.loads((WORK / "results.json").read_text())[module]["status"]
        names = [n for n, s in previous.items() if s == "survived"]
        if names:
            subprocess.run([mutmut, "run", "--max-children", str(max_children), *names],
                           cwd=work, env=_env(module), check=False, stdout=subprocess.DEVNULL)
        rerun = results(work, mutmut)  # (mutants not re-run may read "not checked" now)
        return {**previous, **{n: rerun[n] for n in names if n in rerun}}
    work = prepare(module)
    prebuild(module)
    subprocess.run([mutmut, "run", "--max-children", str(max_children)], cwd=work,
                   env=_env(module), check=False, stdout=subprocess.DEVNULL)
    return results(work, mutmut)


def summarize(status: dict[str, str], equivalent: dict[str, str]) -> dict:
    """Counts per status, survivors split into equivalent (explained) and live. A mutant
    mutmut never checked (its clean run of the selection failed, or the run was stopped)
    counts as not detected: such a run scores low instead of a vacuous 100 %."""
    counts = dict(Counter(status.values()))
    survivors = sorted(n for n, s in status.items() if s == "survived")
    live = [n for n in survivors if n not in equivalent]
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    non_equivalent = detected + len(live) + counts.get("not checked", 0)
    return {
        "counts": counts,
        "equivalent": sorted(set(survivors) - set(live)),
        "live_survivors": live,
        "score": round(detected / non_equivalent, 4) if non_equivalent else 1.0,
        "status": status,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected modules and print the per-module table; exit 1 below `--target`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*",
                        help=f"modules of src/usae, dotted (default: {' '.join(CORE)})")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--rerun", action="store_true", help="re-run the last run's survivors")
    parser.add_argument("--collect", action="store_true",
                        help="only read the results already in the work folders (and record "
                             "them again, with the equivalents listed now)")
    parser.add_argument("--changed", action="store_true",
                        help="only the modules changed since scripts/mutation_record.json")
    parser.add_argument("--budget", type=float, default=0,
                        help="minutes: start no module after this much time (0: no limit)")
    parser.add_argument("--table", action="store_true",
                        help="print the record as docs/TESTING.md's table and stop")
    parser.add_argument("--target", type=float, default=0.90)
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.changed:
        args.modules = changed_modules()
        print(f"changed since the record: {' '.join(args.modules) or 'nothing'}", flush=True)
    elif not args.modules:
        args.modules = list(CORE)
    unknown = sorted(set(args.modules) - set(all_modules()))
    if unknown:
        parser.error(f"not a module of src/usae: {', '.join(unknown)}")
    for module in args.modules:
        if not selection(module):
            parser.error(f"no test file imports usae.{module}: add it to SELECTION")
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    equivalent = equivalent_mutants()
    saved_path = WORK / "results.json"
    began = time.monotonic()
    done = []
    for module in args.modules:
        if args.budget and time.monotonic() - began > args.budget * 60:
            print(f"budget of {args.budget:g} min spent; not run: "
                  f"{' '.join(m for m in args.modules if m not in done)}", flush=True)
            break
        done.append(module)
        start = time.monotonic()
        if args.collect:
            status = _collected(module, results(WORK / module, mutmut), saved_path)
        else:
            status = run_module(module, mutmut, args.max_children, args.rerun)
        WORK.mkdir(exist_ok=True)
        with _results_lock():  # (two runs of this script may finish modules at once)
            saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
            # "seconds": the last full run (a re-run or a collect keeps it)
            seconds = saved.get(module, {}).get("seconds") if args.collect or args.rerun else \
                round(time.monotonic() - start, 1)
            saved[module] = {**summarize(status, equivalent), "seconds": seconds}
            saved_path.write_text(json.dumps(saved, indent=1, sort_keys=True))
            # a run's score, on the source it ran on (a module without a function body has
            # no mutant at all: its empty run is its score)
            unchecked = saved[module]["counts"].get("not checked", 0)
            # (--collect re-counts a finished run, e.g. after equivalents were explained)
            if (status or not has_functions(module)) and not unchecked:
                record(module, saved[module])
        print(_row(module, saved[module]), flush=True)
        if unchecked:
            print(f"{module}: mutmut checked {unchecked} mutants against no test (did the "
                  f"selection fail unmutated? run `mutmut run` in mutants-work/{module} to "
                  "see); not recorded", flush=True)
    saved = json.loads(saved_path.read_text())
    print("\n| module | mutants | killed | timeout | no tests | equivalent | live survivors "
          "| score |")
    print("|---|---|---|---|---|---|---|---|")
    for module in all_modules():
        if module in saved and module in done:
            print(_row(module, saved[module]))
    below = [m for m in done if saved[m]["score"] < args.target]
    for module in done:
        for name in saved[module]["live_survivors"]:
            print(f"survived: {name}")
    return 1 if below else 0


@contextlib.contextmanager
def _results_lock():
    """Hold an exclusive lock on mutants-work/results.lock (results.json and the record are
    read, changed and written under it)."""
    with open(WORK / "results.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _row(module: str, entry: dict) -> str:
    c = entry["counts"]
    return (f"| {module} | {sum(c.values())} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
            f"{c.get('no tests', 0)} | {len(entry['equivalent'])} | {len(entry['live_survivors'])} "
            f"| {entry['score']:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
