"""scripts/mutation.py's score: what counts as detected, and a run that checked nothing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from mutation import _collected, summarize  # noqa: E402


def test_killed_and_timed_out_over_everything_not_explained():
    status = {"a": "killed", "b": "timeout", "c": "survived", "d": "survived", "e": "killed"}
    got = summarize(status, {"d": "a default written out"})
    assert got["score"] == round(3 / 4, 4)
    assert got["equivalent"] == ["d"] and got["live_survivors"] == ["c"]


def test_a_run_that_checked_nothing_scores_nothing():
    status = {f"m{i}": "not checked" for i in range(5)}
    assert summarize(status, {})["score"] == 0.0
    half = {**status, "k": "killed"}
    assert summarize(half, {})["score"] == round(1 / 6, 4)


def test_a_module_without_mutants_is_complete():
    assert summarize({}, {})["score"] == 1.0


def test_equivalent_js_names_may_hold_spaces_in_their_strings(tmp_path, monkeypatch):
    import mutation

    lines = ['app.js:3:1:"use strict">"XXuse strictXX" strict mode changes nothing here',
             "app.js:151:21:<><= a write past the end is ignored",
             "app.js:142:103:>>>= the same page", "usae.x.y__mutmut_1 a default written out"]
    (tmp_path / "eq.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(mutation, "EQUIVALENT_FILE", tmp_path / "eq.txt")
    assert mutation.equivalent_mutants() == {
        'app.js:3:1:"use strict">"XXuse strictXX"': "strict mode changes nothing here",
        "app.js:151:21:<><=": "a write past the end is ignored",
        "app.js:142:103:>>>=": "the same page", "usae.x.y__mutmut_1": "a default written out"}


def test_a_collect_after_a_rerun_keeps_the_statuses_of_the_mutants_not_rerun(tmp_path):
    """mutmut reads "not checked" for the mutants a --rerun skipped; their status is the one
    the last results kept (a collect once scored the trainer 9 % this way)."""
    import json

    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"m": {"status": {"a": "killed", "b": "survived",
                                                  "c": "timeout"}}}))
    got = _collected("m", {"a": "not checked", "b": "killed", "c": "not checked",
                           "d": "not checked"}, saved)
    assert got == {"a": "killed", "b": "killed", "c": "timeout", "d": "not checked"}
    assert _collected("m", {"a": "survived"}, tmp_path / "none.json") == {"a": "survived"}
