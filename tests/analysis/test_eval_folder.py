"""The owner of EVAL/ (``usae.analysis.eval_folder``): which run an eval belongs to, reading
its report and concepts, and ranking concepts. Every case is built by hand: a run folder with
a weights file whose digest is computed here with hashlib, reports written as JSON."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest

from usae.analysis.eval_folder import (
    by_energy,
    check_eval_of_run,
    read_concepts,
    read_report,
    run_identity,
    universal_first,
    weights_digest,
)
from usae.errors import UsaeError


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights of this run")
    (folder / "config.json").write_text(json.dumps({"status": {"step": 7, "state": "final"}}))
    return folder


def _eval(tmp_path, report, files=("report.json", "concepts.csv", "top_images.safetensors")):
    folder = tmp_path / "eval"
    folder.mkdir(exist_ok=True)
    for name in files:
        (folder / name).write_text("x")
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_the_weights_digest_is_sha256_of_the_weights_file(run):
    assert weights_digest(run) == hashlib.sha256(b"weights of this run").hexdigest()
    identity = run_identity(run)
    assert identity["weights_sha256"] == weights_digest(run)
    assert (identity["step"], identity["state"], identity["path"]) == (7, "final", str(run))
    (run / "model.safetensors").unlink()
    with pytest.raises(UsaeError, match="cannot read .*model.safetensors"):
        weights_digest(run)


def test_an_unreadable_weights_file_is_named_with_the_systems_reason_alone(run):
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").mkdir()  # a folder where the file should be
    with pytest.raises(UsaeError, match="^" + re.escape(
            f"cannot read {run / 'model.safetensors'}: Is a directory") + "$"):
        weights_digest(run)


def test_a_report_key_is_an_attribute_named_after_it_required_or_optional():
    from usae.analysis.eval_folder import EvalReport, _Key

    class Report(EvalReport):  # (made here: the keys of a class made at import are fixed)
        needed = _Key()
        maybe = _Key(required=False)

    report = Report({"needed": 3})
    assert (report.needed, report.maybe) == (3, None)
    with pytest.raises(KeyError, match="needed"):
        Report({}).needed
    assert Report.needed.key == "needed" and Report.maybe.required is False


def test_an_eval_of_this_run_is_accepted_and_any_other_refused_with_the_command(run,
                                                                              tmp_path):
    mine = {"models": ["a", "b"], "n_concepts": 8,
            "run": {"weights_sha256": hashlib.sha256(b"weights of this run").hexdigest()}}
    ev = _eval(tmp_path, mine)
    assert check_eval_of_run(ev, run, ["a", "b"], 8).models == ["a", "b"]
    make = f"make an eval of this run with: usae eval {run} --store STORE --out"
    for models, n in ((["a", "c"], 8), (["a", "b"], 16), (["b", "a"], 8)):
        with pytest.raises(UsaeError, match="is an eval of another run") as err:
            check_eval_of_run(ev, run, models, n)
        assert make in str(err.value)
    other = {**mine, "run": {"weights_sha256": "0" * 64, "path": "elsewhere", "step": 3}}
    _eval(tmp_path, other)
    with pytest.raises(UsaeError, match="elsewhere, step 3.*weights differ") as err:
        check_eval_of_run(ev, run, ["a", "b"], 8)
    assert make in str(err.value)


def test_an_older_eval_without_its_run_record_is_accepted_with_a_warning(run, tmp_path,
                                                                         caplog):
    ev = _eval(tmp_path, {"models": ["a"]})  # no n_concepts, no run: written before both
    with caplog.at_level(logging.WARNING):
        assert check_eval_of_run(ev, run, ["a"], 8).models == ["a"]
    assert "does not record which run it evaluated" in caplog.text
    caplog.clear()
    _eval(tmp_path, {"models": ["a"], "n_concepts": 8, "run": {"path": "r"}})
    with caplog.at_level(logging.WARNING):
        check_eval_of_run(ev, run, ["a"], 8)
    assert "does not record which run" in caplog.text
    with pytest.raises(UsaeError, match="is an eval of another run"):
        check_eval_of_run(ev, run, ["a"], 9)


def test_an_eval_missing_a_needed_file_says_which_and_how_to_make_one(run, tmp_path):
    ev = _eval(tmp_path, {"models": ["a"]}, files=("report.json", "concepts.csv"))
    with pytest.raises(UsaeError, match="lacks top_images.safetensors — make an eval"):
        check_eval_of_run(ev, run, ["a"], 8)
    check_eval_of_run(ev, run, ["a"], 8, need=("report.json", "concepts.csv"))


def test_a_missing_or_foreign_report_is_a_clear_error(tmp_path):
    with pytest.raises(UsaeError, match="missing eval report"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UsaeError, match="eval report .* is corrupt"):
        read_report(tmp_path)
    for foreign in ([1, 2], {"r2": []}):
        (tmp_path / "report.json").write_text(json.dumps(foreign))
        with pytest.raises(UsaeError, match="is not a usae eval report"):
            read_report(tmp_path)


def test_concepts_csv_is_read_as_csv_keeps_quoted_newlines(tmp_path):
    # a quoted field may hold a CRLF: csv needs the file opened with newline=""
    (tmp_path / "concepts.csv").write_bytes(b'concept,class,note\r\n0,universal,"a\r\nb"\r\n'
                                            b"1,mixed,c\r\n")
    rows = read_concepts(tmp_path)
    assert rows == [{"concept": "0", "class": "universal", "note": "a\r\nb"},
                    {"concept": "1", "class": "mixed", "note": "c"}]
    with pytest.raises(UsaeError, match="cannot read .*concepts.csv.*usae eval"):
        read_concepts(tmp_path / "none")


ROWS = [{"concept": "0", "class": "mixed", "energy": "5.0"},
        {"concept": "1", "class": "universal", "energy": "2.0"},
        {"concept": "2", "class": "universal", "energy": "9.0"},
        {"concept": "3", "class": "specific_a", "energy": "0.0"},
        {"concept": "4", "class": "never_fire", "energy": "0"},
        {"concept": "5", "class": "specific_b", "energy": "0.5"}]


def test_concepts_rank_by_energy_and_the_universal_ones_come_first():
    assert [r["concept"] for r in by_energy(ROWS)] == ["2", "0", "1", "5", "3", "4"]
    assert [r["concept"] for r in by_energy(ROWS, universal_only=True)] == ["2", "1"]
    # universal by energy, then every other concept that fires, by energy; silent ones last out
    assert universal_first(ROWS) == [2, 1, 0, 5]


def test_report_sections_are_required_or_optional_as_documented():
    from usae.analysis.eval_folder import EvalReport

    report = EvalReport({"models": ["a"], "r2": [[0.5]], "l0": {"a": 3.0}})
    assert report.models == ["a"] and report.r2 == [[0.5]] and report.l0 == {"a": 3.0}
    assert (report.split, report.faithfulness, report.truth, report.run, report.n_concepts) \
        == (None, None, None, None, None)
    for required in ("dead_fraction", "concept_classes", "summary"):
        with pytest.raises(KeyError, match=required):
            getattr(report, required)
    assert EvalReport({"split": "val", "truth": {"x": 1}}).truth == {"x": 1}
    assert EvalReport.r2.required is True and EvalReport.split.required is False
