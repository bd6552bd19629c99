"""Mutation testing of the explorer's JavaScript (``src/usae/explorer/static/app.js``).

mutmut mutates Python only, and the app's tests are Python tests that drive Debian's Chromium
(tests/explorer/test_explorer.py, marked ``browser``). So this is a small mutator of our own:
it reads app.js with a lexer that knows comments, strings, template literals and regular
expressions, and makes one mutant per operator, literal and negation in the code, as mutmut
does for Python:

    === <-> !==    && <-> ||    < -> <=   > -> >=   <= -> <   >= -> >    + <-> -    * <-> /
    ++ <-> --      += <-> -=    true <-> false      !x -> x
    an integer n -> n + 1 (0 -> 1), a decimal -> 0     a string "s" -> "XXsXX", "" -> "XX"

Template literals are left whole (their text is what the browser tests compare), and so are
regular expressions and comments. Each mutant is written over the built site's app.js and the
browser tests run against it, in a worker process that built the site once (its store, run,
eval and CAM are the tests' own fixture, built once by the unmutated code). A mutant is killed
when a test fails or times out.

    python scripts/mutation_js.py                 # every mutant (35 min on 2 cores)
    python scripts/mutation_js.py --list          # the mutants, without running them
    python scripts/mutation_js.py --changed       # only when app.js changed since the record
    python scripts/mutation_js.py --rerun         # only the last full run's survivors

Mutant names are ``app.js:LINE:COL:ORIGINAL>MUTATION``; equivalent ones are listed, with the
reason, in scripts/mutation_equivalent.txt like mutmut's. The score goes into
scripts/mutation_record.json under ``explorer/static/app.js``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mutation  # noqa: E402  (the record and the equivalents list are shared)

APP = ROOT / "src" / "usae" / "explorer" / "static" / "app.js"
KEY = "explorer/static/app.js"
WORK = mutation.WORK / "app.js"
TEST_MODULE = "tests.explorer.test_explorer"
MUTANT_SECONDS = 120  # a mutant that hangs the page fails the tests' waits (WAIT_MS) first
WAIT_MS = 5000  # the tests' Playwright waits (30 s by default; the site loads in under 1 s)

SWAPS = {"===": "!==", "!==": "===", "&&": "||", "||": "&&", "<=": "<", ">=": ">",
         "++": "--", "--": "++", "+=": "-=", "-=": "+=", "<": "<=", ">": ">=", "+": "-",
         "-": "+", "*": "/", "/": "*"}
OPERATORS = sorted(SWAPS, key=len, reverse=True)  # longest first: `===` before `=`
REGEX_MAY_FOLLOW = set("(,=:[!&|?{};+-*%<>~^") | {""}
WORDS = {"true": "false", "false": "true"}


@dataclass(frozen=True)
class Mutant:
    start: int  # offset of the replaced text in app.js
    original: str
    mutation: str
    line: int
    col: int

    @property
    def name(self) -> str:
        return f"app.js:{self.line}:{self.col}:{self.original}>{self.mutation}"

    def apply(self, text: str) -> str:
        assert text[self.start:self.start + len(self.original)] == self.original
        return text[:self.start] + self.mutation + text[self.start + len(self.original):]


def _skip_string(text: str, i: int) -> int:
    """Offset just past the quoted string (or template literal) that starts at ``i``."""
    quote, i = text[i], i + 1
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quote == "`" and c == "$" and text[i + 1:i + 2] == "{":
            depth += 1
        elif quote == "`" and c == "}" and depth:
            depth -= 1
        elif c == quote and not depth:
            return i + 1
        i += 1
    raise ValueError("unterminated string in app.js")


def _skip_regex(text: str, i: int) -> int:
    i += 1
    in_class = False
    while text[i] != "/" or in_class:
        if text[i] == "\\":
            i += 1
        elif text[i] == "[":
            in_class = True
        elif text[i] == "]":
            in_class = False
        i += 1
    i += 1
    while i < len(text) and text[i].isalpha():  # flags
        i += 1
    return i


def mutants(text: str) -> list[Mutant]:
    """Every mutant of ``text`` (JavaScript), in source order."""
    out: list[Mutant] = []
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def add(start: int, original: str, mutation_: str) -> None:
        line = next(n for n in range(len(line_starts), 0, -1) if line_starts[n - 1] <= start)
        out.append(Mutant(start, original, mutation_, line, start - line_starts[line - 1] + 1))

    i, last = 0, ""  # last: the previous significant character (regex or division?)
    while i < len(text):
        c, two = text[i], text[i:i + 2]
        if c.isspace():
            i += 1
        elif two == "//":
            i = text.index("\n", i)
        elif two == "/*":
            i = text.index("*/", i) + 2
        elif c in "\"'":
            end = _skip_string(text, i)
            body = text[i + 1:end - 1]
            add(i, text[i:end], f"{c}XX{body}XX{c}")
            i, last = end, c
        elif c == "`":
            i, last = _skip_string(text, i), c
        elif c == "/" and last in REGEX_MAY_FOLLOW:
            i, last = _skip_regex(text, i), "/"
        elif c.isdigit():  # (digits inside a name were read with the name)
            number = re.match(r"\d+(\.\d+)?", text[i:]).group(0)
            add(i, number, "0" if "." in number else str(int(number) + 1))
            i, last = i + len(number), "0"
        elif c.isalpha() or c in "_$":
            word = re.match(r"[\w$]+", text[i:]).group(0)
            if word in WORDS:
                add(i, word, WORDS[word])
            i, last = i + len(word), "a"
        elif c == "!" and text[i + 1] != "=":
            add(i, "!", "")
            i, last = i + 1, "!"
        elif c == "=" and text[i + 1] == ">":  # an arrow, not a comparison
            i, last = i + 2, ">"
        else:
            op = next((o for o in OPERATORS if text.startswith(o, i)), None)
            if op is not None:
                add(i, op, SWAPS[op])
            step = len(op) if op is not None else 1
            i, last = i + step, text[i + step - 1]
    return out


# ---- the worker: one built site, mutants run one after another ----------------------------
def _browser_tests(module) -> list:
    tests = []
    for name in dir(module):
        fn = getattr(module, name)
        marks = getattr(fn, "pytestmark", [])
        if name.startswith("test_") and any(m.name == "browser" for m in marks):
            tests.append(fn)
    return tests


def _call(test, root: Path, browser) -> None:
    """A browser test with the fixtures it names: the built site, the worker's Chromium, and
    a fresh folder for anything else (tmp_path)."""
    import inspect

    given = {"explorer": root, "chromium": browser}
    test(**{param: given.get(param) or Path(tempfile.mkdtemp(dir=root))
            for param in inspect.signature(test).parameters})


def _launch(module):
    """Playwright and one Chromium, as the test module's ``chromium`` fixture starts them."""
    playwright, args = module._launch(module._browser())
    return playwright, playwright.chromium.launch(executable_path=module.CHROMIUM, args=args)


def worker(root: Path, names: list[str], out: Path) -> None:
    """Run ``names`` against the site in ``root``; one JSON line per mutant into ``out``."""
    import importlib

    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(TEST_MODULE)
    tests = _browser_tests(module)
    text = APP.read_text()
    by_name = {m.name: m for m in mutants(text)}
    site_app = root / "site" / "app.js"
    os.environ["USAE_TEST_APP_JS"] = str(site_app)  # (sites a test writes by hand take it too)

    def alarm(*_):
        raise TimeoutError("mutant timed out")

    signal.signal(signal.SIGALRM, alarm)
    playwright, browser = _launch(module)
    with out.open("a") as fh:
        for name in names:
            site_app.write_text(by_name[name].apply(text))
            began, status = time.monotonic(), "survived"
            signal.alarm(MUTANT_SECONDS)
            try:
                for test in tests:
                    _call(test, root, browser)
            except TimeoutError:
                status = "timeout"
            except BaseException as err:  # noqa: BLE001 - any failure kills the mutant
                status = "killed" if not isinstance(err, KeyboardInterrupt) else "interrupted"
            finally:
                signal.alarm(0)
            if status != "survived" or not browser.is_connected():
                for context in list(browser.contexts) if browser.is_connected() else []:
                    context.close()
                if status == "timeout" or not browser.is_connected():
                    playwright.stop()  # a fresh Chromium: nothing of a broken page carries on
                    playwright, browser = _launch(module)
            fh.write(json.dumps({"name": name, "status": status,
                                 "seconds": round(time.monotonic() - began, 1)}) + "\n")
            fh.flush()
            if status == "interrupted":
                break
    site_app.write_text(text)
    playwright.stop()


def build_site(folder: Path) -> Path:
    """The browser tests' fixture, built once by the unmutated code into ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(mutation._env(), USAE_TEST_ARTIFACTS=str(folder / "artifacts"),
               USAE_TEST_ARTIFACTS_WRITE="1")
    (folder / "artifacts").mkdir()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"{TEST_MODULE.replace('.', '/')}.py::test_site_files"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return folder / "artifacts" / "explorer-inputs"


def _site_copy(inputs: Path, root: Path) -> None:
    from usae.explorer.build import build_explorer

    shutil.copytree(inputs, root)
    build_explorer(root / "run", root / "store", root / "site", eval_dir=root / "eval",
                   progress=False)


def run_all(names: list[str], jobs: int) -> dict[str, str]:
    """Every mutant in ``names`` over ``jobs`` workers; mutant name -> status."""
    inputs = build_site(WORK)
    done = WORK / "done"
    done.mkdir()
    procs = []
    for j in range(jobs):
        root = WORK / f"worker{j}"
        _site_copy(inputs, root)
        part = names[j::jobs]
        (WORK / f"worker{j}.names").write_text("\n".join(part))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(root), str(WORK / f"worker{j}.names"),
             str(done / f"worker{j}.jsonl")], cwd=ROOT,
            env=dict(mutation._env(), USAE_TEST_BROWSER_WAIT_MS=str(WAIT_MS))))
    for p in procs:
        p.wait()
    status = {}
    for path in done.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            status[row["name"]] = row["status"]
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--changed", action="store_true",
                        help="only when app.js differs from the recorded run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="these mutant names only")
    parser.add_argument("--rerun", action="store_true",
                        help="re-run the last full run's survivors (after adding tests)")
    parser.add_argument("--worker", nargs=3, metavar=("ROOT", "NAMES", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        root, names, out = args.worker
        worker(Path(root), Path(names).read_text().split("\n"), Path(out))
        return 0
    all_mutants = mutants(APP.read_text())
    if args.list:
        for m in all_mutants:
            print(m.name)
        print(f"{len(all_mutants)} mutants", file=sys.stderr)
        return 0
    saved = mutation.read_record().get(KEY)
    if args.changed and saved and saved["sha"] == _sha():
        print(f"{KEY}: unchanged since its recorded run")
        return 0
    results = WORK / "results.json"
    previous: dict[str, str] = {}
    full_seconds = None
    if args.rerun:
        saved_run = json.loads(results.read_text()) if results.exists() else None
        recorded = mutation.read_record().get(KEY)
        if saved_run is None or recorded is None or recorded["sha"] != _sha():
            parser.error("no full run of this app.js to re-run: run it in full")
        previous, full_seconds = saved_run["status"], saved_run.get("seconds")
        args.only = [n for n, st in previous.items() if st == "survived"]
    names = args.only or [m.name for m in all_mutants]
    unknown = sorted(set(names) - {m.name for m in all_mutants})
    if unknown:
        parser.error(f"not a mutant of app.js: {', '.join(unknown)} (see --list)")
    began = time.monotonic()
    status = {**previous, **run_all(names, args.jobs)}
    equivalent = mutation.equivalent_mutants()
    entry = {**mutation.summarize(status, equivalent), "sha": _sha(),
             "seconds": round(time.monotonic() - began, 1)}
    if full_seconds is not None:  # (a re-run keeps the time of the full run)
        entry["seconds"] = full_seconds
    if args.rerun or not args.only:
        results.write_text(json.dumps(entry, indent=1, sort_keys=True))
        record(entry)
    c = entry["counts"]
    print(f"| {KEY} | {sum(c.values())} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
          f"{len(entry['equivalent'])} | {len(entry['live_survivors'])} | {entry['score']:.1%} |")
    for name in entry["live_survivors"]:
        print(f"survived: {name}")
    return 0 if entry["score"] >= 0.9 else 1


def _sha() -> str:
    return mutation._hash_of(KEY)


def record(entry: dict) -> None:
    import datetime

    saved = mutation.read_record()
    c = entry["counts"]
    saved[KEY] = {"sha": _sha(), "date": datetime.date.today().isoformat(),
                  "mutants": sum(c.values()), "killed": c.get("killed", 0) + c.get("timeout", 0),
                  "equivalent": len(entry["equivalent"]), "live": len(entry["live_survivors"]),
                  "no_tests": 0, "score": entry["score"], "seconds": entry["seconds"]}
    tmp = mutation.RECORD_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, mutation.RECORD_FILE)


if __name__ == "__main__":
    sys.exit(main())
