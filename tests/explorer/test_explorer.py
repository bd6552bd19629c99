"""The explorer in a real browser (Debian's Chromium driven by Playwright), from file:// and
through ``usae serve``."""

import base64
import json
import math
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import per_test_under_mutation, prebuilt
from usae.analysis.evaluate import evaluate
from usae.cam.maximize import run_cam
from usae.config import resolve
from usae.data.cache import cache
from usae.data.sources import StoreSource
from usae.explorer.build import build_explorer
from usae.explorer.serve import make_server
from usae.sae.training import train_run
from usae.store.store import Store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "explorer"
XSS = "<img src=x onerror=window.pwned=1>"
CAM_CONCEPT = 7
# Playwright waits up to 30 s for a selector; scripts/mutation_js.py, whose mutants often
# break the page, sets less (the site loads in well under a second here)
WAIT_MS = int(os.environ.get("USAE_TEST_BROWSER_WAIT_MS", "30000"))


@pytest.fixture(scope=per_test_under_mutation("explorer.build"))
def explorer(tmp_path_factory):
    """Images (one class label with markup), a store, a run, its eval and one concept's CAM
    (prebuilt once under mutation testing: none of it runs the explorer's code), then the
    site built from them."""
    root = tmp_path_factory.mktemp("explorer")

    def build(dest):
        rng = np.random.default_rng(0)
        for i in range(24):
            label = XSS if i % 3 == 0 else f"class{i % 3}"
            path = dest / "imgs" / label / f"img{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, (1, 1, 3))
            grad = np.linspace(0, 1, 96)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
            arr = np.clip(base * 0.5 + grad + rng.normal(0, 20, (96, 96, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(path)
        cache("effnet:lite0?img_size=128&name=lite0,effnet:lite1?img_size=128&name=lite1",
              dest / "imgs", dest / "store", workers=0, progress=False)
        store = Store(dest / "store")
        cfg = resolve(store.models, store.dims, "demo", {"n_concepts": 96, "k": 4,
                                                         "batch_images": 4, "max_steps": 60})
        train_run(cfg, StoreSource(store, "train"), dest / "run", progress=False)
        evaluate(dest / "run", dest / "store", dest / "eval", split="all", progress=False)
        run_cam(dest / "run", dest / "store", [CAM_CONCEPT], eval_dir=dest / "eval", steps=3,
                size=48, crops=1, progress=False)

    prebuilt("explorer-inputs", root, build)
    build_explorer(root / "run", root / "store", root / "site", eval_dir=root / "eval",
                   progress=False)
    return root


def test_site_files(explorer):
    site = explorer / "site"
    assert (site / "index.html").exists() and (site / "data" / "overview.js").exists()
    assert list((site / "thumbs").glob("*.jpg")) and list((site / "plots").glob("*.png"))
    text = (site / "data" / "overview.js").read_text()
    overview = json.loads(text[text.index("=") + 1:text.rindex(";")])
    assert overview["n_concepts"] == 96 and overview["models"] == ["lite0", "lite1"]


def _browser():
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make test installs it)")
    return pw


def _check_site(page, url, tag):
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#concepts tr[data-concept]")
    first = page.eval_on_selector_all("#concepts tr[data-concept]",
                                      "rows => rows.map(r => r.dataset.concept)")
    assert len(first) == 96
    page.click("th[data-key=id]")
    by_id = page.eval_on_selector_all("#concepts tr[data-concept]",
                                      "rows => rows.map(r => r.dataset.concept)")
    assert by_id == [str(i) for i in range(96)] and by_id != first
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"overview_{tag}.png"), full_page=False)
    page.click("th[data-key=energy]")
    top = page.eval_on_selector("#concepts tr[data-concept]", "r => r.dataset.concept")
    page.click(f"#concepts tr[data-concept='{top}'] a")
    page.wait_for_selector(".row[data-model] canvas")
    assert page.eval_on_selector_all(".row[data-model]", "rs => rs.map(r => r.dataset.model)") \
        == ["lite0", "lite1"]
    counts = page.eval_on_selector_all(
        ".row[data-model]", "rs => rs.map(r => r.querySelectorAll('canvas').length)")
    assert counts[0] == counts[1] > 0
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"concept_{tag}.png"), full_page=True)
    # the label with markup is shown as text and never runs
    assert page.evaluate("window.pwned") is None
    assert page.eval_on_selector_all("#app img[src=x]", "els => els.length") == 0
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"location.hash === '#/concept/{int(top) + 1}'" if int(top) < 95
                           else "true")
    page.keyboard.press("Escape")
    page.wait_for_selector("#concepts")
    assert not errors, errors


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module's browser tests (each test opens and closes its
    own contexts in it)."""
    pw = _browser()
    p, args = _launch(pw)
    try:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()
    finally:
        p.stop()


def _launch(pw):
    return pw.sync_playwright().start(), [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_explorer_from_file_and_from_serve(explorer, chromium, tmp_path):
    browser = chromium
    try:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(WAIT_MS)
        page = ctx.new_page()
        _check_site(page, (explorer / "site" / "index.html").as_uri(), "file")
        server = make_server(explorer / "site", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            page2 = ctx.new_page()
            _check_site(page2, f"http://127.0.0.1:{server.server_address[1]}/", "serve")
        finally:
            server.shutdown()
            server.server_close()
    finally:
        for context in browser.contexts:
            context.close()


@pytest.mark.browser
def test_overview_shows_the_faithfulness_table_cell_by_cell(explorer, chromium):
    """Each cell, recomputed from report.json here: top-1 agreement in % / KL recovered."""
    report = json.loads((explorer / "eval" / "report.json").read_text())
    f = report["faithfulness"]

    words = _words()

    def cell(a, k):
        return words["not_available"] if a is None or k is None else f"{100 * a:.1f}% / {k:.3f}"

    want = [cell(f["top1_agreement"][i][j], f["kl_recovered"][i][j])
            for i in range(2) for j in range(2)]
    want += [cell(f["resample_only"][m]["top1_agreement"], f["resample_only"][m]["kl_recovered"])
             for m in ("lite0", "lite1")]
    browser = chromium
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(WAIT_MS)
        page.goto((explorer / "site" / "index.html").as_uri())
        page.wait_for_selector("table.faithfulness td")
        cells = page.eval_on_selector_all("table.faithfulness td",
                                          "tds => tds.map(t => t.textContent)")
        assert cells == want
        heads = page.eval_on_selector_all("table.faithfulness th",
                                          "ths => ths.map(t => t.textContent)")
        assert heads == ["", *f["models"], *f["models"], words["grid_only"]]
        assert page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)") == [
            words["r2_matrix"], words["faithfulness"], words["plots"], words["concepts"]]
        facts = _page_facts(page)
        assert facts["unknown"] == [] and set(facts["classes"]) <= _styled_classes() | \
            TEST_HOOKS, facts
    finally:
        for context in browser.contexts:
            context.close()
    overview = (explorer / "site" / "data" / "overview.js").read_text()
    assert str(explorer) not in overview  # the run's path is not in the shared site


@pytest.mark.browser
def test_concept_page_shows_cam_images_alpha_maps_and_checks(explorer, chromium):
    browser = chromium
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(WAIT_MS)
        page.goto((explorer / "site" / "index.html").as_uri() + f"#/concept/{CAM_CONCEPT}")
        page.wait_for_selector(".cams .tile.cam img")
        page.wait_for_function("[...document.querySelectorAll('.cams img')].every(i => "
                               "i.complete && i.naturalWidth > 0)")
        assert page.eval_on_selector_all(".cams .tile.cam", "ts => ts.map(t => "
                                         "t.dataset.model)") == ["lite0", "lite1"]
        words = _words()
        texts = lambda sel: page.eval_on_selector_all(sel, "es => es.map(e => e.textContent)")  # noqa: E731
        assert texts("h2") == [words["cam"]] and texts(".cams .cap") == ["lite0", "lite1"]
        assert texts(".camnote")[0] == words["cam_note"]
        assert texts(".camchecks th") == [words["self_ratio"]]
        assert texts("table.transfer th")[:3] == [words["transfer"], "lite0", "lite1"]
        assert page.eval_on_selector_all(".cams img.alpha", "is => is.map(i => i.alt)") == [
            f"{m}: where the objective's gradient was (transparency map)"
            for m in ("lite0", "lite1")]
        facts = _page_facts(page)
        assert facts["unknown"] == [] and set(facts["classes"]) <= _styled_classes() | \
            TEST_HOOKS, facts
        assert page.eval_on_selector_all(".cams img.alpha", "els => els.length") == 2
        doc = json.loads((explorer / "run" / "cam" / str(CAM_CONCEPT) / "cam.json").read_text())
        cells = page.eval_on_selector_all(".camchecks td", "tds => tds.map(t => t.textContent)")
        assert cells == [f"{m} {_f(doc['self_ratio'][m], 2)}" for m in ("lite0", "lite1")]
        transfer = page.eval_on_selector_all(
            "table.transfer[data-kind=transfer] td", "tds => tds.map(t => t.textContent)")
        assert transfer == [_f(v, 2) for row in doc["transfer"] for v in row]
        assert page.locator("table.transfer").count() == 2  # the matrix and its control
        control = page.eval_on_selector_all(
            f"table.transfer[data-kind='control (concept {doc['control_concept']})'] td",
            "tds => tds.map(t => t.textContent)")
        assert control == [_f(v, 2) for row in doc["transfer_control"] for v in row]
        assert page.eval_on_selector_all(".cams img:not(.alpha)", "is => is.map(i => i.alt)") \
            == [f"{m}: image optimized for this concept" for m in ("lite0", "lite1")]
        assert page.text_content(".camnote >> nth=1") == (
            f"mean off-diagonal transfer {_f(doc['transfer_offdiag_mean'], 2)} against "
            f"{_f(doc['transfer_control_offdiag_mean'], 2)} for the frequency-matched control "
            "concept's images")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "concept_cam.png"), full_page=True)
    finally:
        for context in browser.contexts:
            context.close()


def test_serve_binds_localhost_and_refuses_traversal(explorer, tmp_path):
    (explorer / "secret.txt").write_text("outside")
    server = make_server(explorer / "site", 0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert urllib.request.urlopen(base + "/index.html").status == 200
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/data/../../secret.txt",
                     "/..%2fsecret.txt", "/data/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path)
            assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_usae_serve_prints_its_url_and_stops_on_ctrl_c(explorer):
    import signal
    import subprocess
    import sys

    # a shell's background job inherits SIGINT ignored (and Python then keeps it so): give
    # the server the disposition an interactive terminal would
    proc = subprocess.Popen([sys.executable, "-m", "usae.cli", "serve", str(explorer / "site"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        assert urllib.request.urlopen(url).status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        proc.kill()


def _words() -> dict[str, str]:
    """The app's words by place (text.js), read here with json."""
    from usae.explorer.build import STATIC

    return _load_js(STATIC / "text.js")


def _load_js(path):
    text = path.read_text()
    start = text.index("(") + 1 if text.startswith("USAE_CHUNK") else text.index("=") + 1
    end = text.rindex(")") if text.startswith("USAE_CHUNK") else text.rindex(";")
    return json.loads(text[start:end])


def test_concept_maps_rankings_and_scale_match_the_codes(explorer):
    """Guards the explorer's data: the token map of each shown image is that image's codes in
    row-major token order (a mirrored token index fails), on one scale per concept (the max
    over models and images), and the rankings are the eval's top images."""
    import base64

    from usae.files import load_safetensors
    from usae.sae.model import UniversalSAE

    site, store = explorer / "site", Store(explorer / "store")
    sae = UniversalSAE.load(explorer / "run")
    top = load_safetensors(explorer / "eval" / "top_images.safetensors")
    chunk = _load_js(site / "data" / "concepts_0.js")["concepts"]
    overview = _load_js(site / "data" / "overview.js")
    checked = 0
    for k_str, entry in list(chunk.items())[:20]:
        k = int(k_str)
        want_rank = [int(r) for r, s in zip(top["rows.mean"][k, :10].tolist(),
                                            top["scores.mean"][k, :10].tolist()) if s > 0]
        assert entry["rankings"]["mean"] == want_rank
        if not entry["images"]:
            continue
        codes = {}
        for m in sae.models:
            x = store.read(m, np.asarray(entry["images"]))
            b, t, d = x.shape
            codes[m] = sae.encode(m, x.reshape(-1, d))[:, k].reshape(b, t).numpy()
        scale = max(float(c.max()) for c in codes.values())
        assert entry["scale"] == pytest.approx(scale, rel=1e-5)
        for m in sae.models:
            got = np.frombuffer(base64.b64decode(entry["maps"][m]), np.uint8).reshape(
                len(entry["images"]), store.tokens)
            want = np.round(codes[m] / scale * 255) if scale > 0 else np.zeros_like(codes[m])
            np.testing.assert_allclose(got, want, atol=1)
        checked += 1
    assert checked > 3
    assert overview["grid"] == store.grid() and overview["top"] == 10
    assert "/" not in overview["run"] and overview["run"] == "run"  # the name, not a path
    thumb = Image.open(site / "thumbs" / next(iter(
        p for p in (site / "thumbs").iterdir())).name)
    assert thumb.size == (128, 128)


def test_the_app_never_writes_html_from_data():
    """XSS without a browser: app.js puts data in the page through textContent/attributes
    only; none of the HTML-parsing sinks appears in it."""
    from usae.explorer.build import STATIC

    app = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in app, sink


def test_the_servers_own_guard_refuses_paths_and_symlinks_outside(tmp_path):
    """The traversal guard itself (not the standard library's), including a symlink inside
    the folder that points outside it."""
    from usae.explorer.serve import ExplorerHandler

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("x")
    (tmp_path / "secret.txt").write_text("outside")
    (site / "link.txt").symlink_to(tmp_path / "secret.txt")
    (site / "inner.txt").write_text("in")
    handler = ExplorerHandler.__new__(ExplorerHandler)
    handler.directory = str(site)
    outside = str(site.resolve() / "__outside__")
    root = site.resolve()
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/a/../../secret.txt",
                 "/..%2fsecret.txt", "//etc/passwd/../../../secret.txt", "/link.txt"):
        got = Path(handler.translate_path(path))
        assert got != (tmp_path / "secret.txt").resolve(), path
        assert got == root or root in got.parents, path  # clamped inside the folder
    assert handler.translate_path("/link.txt") == outside  # a symlink out is refused
    assert handler.translate_path("/inner.txt?x=1#y") == str((site / "inner.txt").resolve())
    assert handler.translate_path("/") == str(site.resolve())


def _styled_classes() -> set[str]:
    """Every class a selector of the app's stylesheet names."""
    import re

    from usae.explorer.build import STATIC

    css = re.sub(r"/\*.*?\*/", "", (STATIC / "style.css").read_text(), flags=re.S)
    return set(re.findall(r"\.([A-Za-z][\w-]*)", css))


# classes that no rule styles but that these tests select by (table.faithfulness, .camchecks)
TEST_HOOKS = {"faithfulness", "camchecks"}


def _f(v, digits=3):
    """The app's number format (fmt, JavaScript's toFixed: halves of the exact binary value
    round away from zero, where Python's format rounds them to even); a dash when missing."""
    from decimal import ROUND_HALF_UP, Decimal

    if v is None:
        return "—"
    return str(Decimal(v).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _page_facts(page) -> dict:
    """Structure the page must keep whatever its data: unknown (misspelt) elements, and
    classes that neither the stylesheet nor a test hook names."""
    return page.evaluate("""() => {
        const all = [...document.querySelectorAll('*')];
        return {unknown: all.filter(e => e instanceof HTMLUnknownElement).map(e => e.tagName),
                classes: [...new Set(all.flatMap(e => [...e.classList]))]};
    }""")


@pytest.mark.browser
def test_every_view_shows_the_data_it_is_given(explorer, chromium):
    """The overview, the concept table (sorting, filtering), concept pages (metrics, nav,
    rankings, tiles, a dead concept, a missing one), the keys and the search box, each checked
    against the site's own data files and report.json, read here with json; and every page is
    made of known HTML elements whose classes the stylesheet (or a test) names."""
    site = explorer / "site"
    ov = _load_js(site / "data" / "overview.js")
    report, table, models, n = ov["report"], ov["table"], ov["models"], ov["n_concepts"]
    chunk = _load_js(site / "data" / "concepts_0.js")["concepts"]
    styled = _styled_classes() | TEST_HOOKS
    browser = chromium
    try:
        page, errors = _open_page(browser)
        page.goto((site / "index.html").as_uri())
        page.wait_for_selector("#concepts tr[data-concept]")
        texts = lambda sel: page.eval_on_selector_all(sel, "es => es.map(e => e.textContent)")  # noqa: E731
        facts = _page_facts(page)
        assert facts["unknown"] == [] and set(facts["classes"]) <= styled, facts
        assert page.text_content("#runinfo") == ov["run"]
        # overview: the title, the cards and the R² matrix, from report.json
        assert page.text_content("h1") == f"{n} concepts in one space shared by " \
            + ", ".join(models)
        s, cc = report["summary"], report["concept_classes"]
        assert texts(".card .v") == [
            _f(s["self_r2_mean"]), _f(s["cross_r2_mean"]), str(cc["universal"]),
            str(sum(cc["model_specific"].values())), str(cc["never_fire"]),
            f"{report['n_tokens']:,}", _f(s["jaccard_cross_mean"])]
        words = _words()
        assert texts(".card .k") == [
            words["self_r2"], words["cross_r2"],
            f"universal (firing entropy ≥ {cc['thresholds']['universal_fe_at_least']})",
            f"model-specific (FE ≤ {cc['thresholds']['model_specific_fe_at_most']})",
            words["never_fire"], f"tokens evaluated ({report['split']})", words["jaccard"]]
        assert texts("label[for=filter]") == [words["show"]]
        assert texts(".filters .muted") == [words["table_hint"]]
        assert texts("#concepts th") == [
            words["concept"], words["energy"], words["firing_entropy"], words["cofires"],
            *[f"fires {m}" for m in models], *[f"CFP {m}" for m in models], words["class"]]
        assert texts(".pager button") == [words["previous_page"], words["next_page"]]
        matrix = page.eval_on_selector_all(
            "table.matrix:not(.faithfulness) tr",
            "rs => rs.map(r => [...r.children].map(c => c.textContent))")
        assert matrix == [["", *models]] + [[m, *[_f(v) for v in row]]
                                            for m, row in zip(models, report["r2"])]
        assert page.eval_on_selector_all(".plots img", "is => is.map(i => i.getAttribute("
                                         "'src'))") == [f"plots/{x}" for x in ov["plots"]]
        # the concept table: by energy, highest first, ties by id; a second click ascends
        energy = [(-1e300 if v is None else v) for v in table["energy"]]
        shown = lambda: [int(x) for x in page.eval_on_selector_all(  # noqa: E731
            "#concepts tr[data-concept]", "rs => rs.map(r => r.dataset.concept)")]
        assert shown() == sorted(range(n), key=lambda k: (-energy[k], k))
        k0 = shown()[0]
        row = page.eval_on_selector_all(f"#concepts tr[data-concept='{k0}'] td",
                                        "tds => tds.map(t => t.textContent)")
        kind = table["class"][k0]
        assert row == [f"#{k0}", _f(table["energy"][k0]), _f(table["firing_entropy"][k0]),
                       str(table["cofires"][k0]), *[str(table[f"fires_{m}"][k0]) for m in models],
                       *[_f(table[f"cfp_{m}"][k0]) for m in models],
                       f"only {kind[9:]}" if kind.startswith("specific:") else kind]
        assert page.text_content(".pager span") == f"page 1 of 1 · {n} concepts"
        assert page.is_disabled(".pager button >> nth=0")
        page.click("th[data-key=energy]")
        assert shown() == sorted(range(n), key=lambda k: (energy[k], k))
        assert page.get_attribute("th[data-key=energy]", "class") == "sorted asc"
        page.click("th[data-key=cofires]")
        assert shown() == sorted(range(n), key=lambda k: (-table["cofires"][k], k))
        for kind in ("universal", "specific", "dead", "mixed", "all"):
            page.select_option("#filter", kind)
            want = [k for k in range(n) if kind == "all" or table["class"][k].split(":")[0] == kind]
            assert sorted(shown()) == want
            assert page.text_content(".pager span") == f"page 1 of 1 · {len(want)} concepts"
        # a concept page: its metrics, nav, rankings and tiles, from its data chunk
        k = next(int(c) for c, e in chunk.items() if e["rankings"]["mean"]
                 and e["rankings"]["lite0"] != e["rankings"]["mean"])
        entry = chunk[str(k)]
        page.goto((site / "index.html").as_uri() + f"#/concept/{k}")
        page.wait_for_selector(".row[data-model] .tile")
        facts = _page_facts(page)
        assert facts["unknown"] == [] and set(facts["classes"]) <= styled, facts
        assert page.text_content("#concept-title").startswith(f"Concept #{k} ")
        assert texts(".metrics:not(.camchecks) td") == [
            _f(table["energy"][k], 4), _f(table["firing_entropy"][k]), str(table["cofires"][k]),
            *[f"{table[f'fires_{m}'][k]} (CFP {_f(table[f'cfp_{m}'][k], 2)})" for m in models]]
        assert page.eval_on_selector_all(".nav a", "as => as.map(a => a.getAttribute('href'))") \
            == ["#/", f"#/concept/{max(0, k - 1)}", f"#/concept/{min(n - 1, k + 1)}"]
        assert texts(".nav a") == [words["to_overview"], words["previous_concept"],
                                   words["next_concept"]]
        assert texts(".metrics:not(.camchecks):not(.transfer) th") == [
            words["energy"], words["firing_entropy"], words["cofires"],
            *[f"fires {m}" for m in models]]
        assert texts(".toolbar button") == [words["mean_ranking"], *models]
        assert texts(".toolbar span") == [words["rank_by"], words["scale_from"], "",
                                          f"{_f(entry['scale'])} (shared by every row)"]

        def tiles(ranking):
            images = ov["images"]
            return [[f"{images[str(r)]['label']} · {images[str(r)]['name']}"
                     for r in ranking]] * len(models)

        caps = lambda: page.eval_on_selector_all(  # noqa: E731
            ".row[data-model]", "rs => rs.map(r => [...r.querySelectorAll('.cap')].map("
            "c => c.textContent))")
        assert caps() == tiles(entry["rankings"]["mean"])
        assert page.get_attribute(".toolbar button >> nth=0", "aria-pressed") == "true"
        page.click(".toolbar button >> nth=1")
        page.wait_for_function("document.querySelector('.toolbar button[aria-pressed=true]')"
                               ".textContent === 'lite0'")
        assert caps() == tiles(entry["rankings"]["lite0"])
        name = ov["images"][str(entry["rankings"]["lite0"][0])]["name"]
        assert page.get_attribute(".row[data-model=lite1] canvas", "aria-label") == \
            f"lite1 heatmap on {name}"
        # the keys and the search box move between concepts
        for key, want in (("ArrowRight", k + 1), ("k", k), ("j", k + 1), ("ArrowLeft", k)):
            page.keyboard.press(key)
            page.wait_for_function(f"location.hash === '#/concept/{want}'")
        page.keyboard.press("u")
        page.wait_for_function("location.hash === '#/'")
        page.fill("#goto", str(n - 1))
        page.press("#goto", "Enter")
        page.wait_for_function(f"location.hash === '#/concept/{n - 1}'")
        page.wait_for_selector(".nav a")
        assert page.eval_on_selector_all(".nav a", "as => as.map(a => a.getAttribute('href'))") \
            == ["#/", f"#/concept/{n - 2}", f"#/concept/{n - 1}"]
        page.keyboard.press("ArrowRight")  # the last concept has no next
        page.wait_for_timeout(100)
        assert page.evaluate("location.hash") == f"#/concept/{n - 1}"
        # a dead concept says so; a concept that does not exist says so
        dead = [int(c) for c, e in chunk.items() if not e["rankings"]["mean"]]
        if dead:
            page.goto((site / "index.html").as_uri() + f"#/concept/{dead[0]}")
            page.wait_for_selector("p.empty")
            assert texts("p") == [words["dead"]]
            facts = _page_facts(page)
            assert facts["unknown"] == [] and set(facts["classes"]) <= styled, facts
        page.goto((site / "index.html").as_uri() + f"#/concept/{n}")
        page.wait_for_selector("p.empty")
        assert page.text_content("p.empty") == f"There is no concept {n}."
        assert _page_facts(page)["unknown"] == []
        assert not errors, errors
    finally:
        for context in browser.contexts:
            context.close()


def test_the_overview_is_the_eval_and_the_store_read_with_csv_and_json(explorer):
    """overview.js against its sources, read here with csv and json: report.json (without the
    machine's path), concepts.csv column by column, the store's image names and labels, the
    eval's plots and the thumbnails written; the concept chunks hold every concept once."""
    import csv

    site = explorer / "site"
    ov = _load_js(site / "data" / "overview.js")
    report = json.loads((explorer / "eval" / "report.json").read_text())
    report["run"].pop("path")
    assert ov["report"] == report
    with open(explorer / "eval" / "concepts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    models = ["lite0", "lite1"]
    assert ov["models"] == models and ov["n_concepts"] == len(rows) == 96
    assert ov["chunk"] == 64 and ov["top"] == 10 and ov["run"] == "run"

    def column(name, cast=float):
        return [None if r[name] == "" else cast(r[name]) for r in rows]

    want = {"energy": column("energy"), "firing_entropy": column("firing_entropy"),
            "cofires": column("cofires", int), "class": [r["class"] for r in rows],
            **{f"fires_{m}": column(f"fires_{m}", int) for m in models},
            **{f"cfp_{m}": column(f"cofire_proportion_{m}") for m in models}}
    assert ov["table"] == want
    assert ov["plots"] == sorted(p.name for p in (explorer / "eval").glob("*.png"))
    manifest = json.loads((explorer / "store" / "manifest.json").read_text())
    assert ov["images"], "the shown images"
    for r, info in ov["images"].items():
        image = manifest["images"][int(r)]
        assert info == {"name": Path(image["path"]).name, "label": image.get("label"),
                        "thumb": f"thumbs/{r}.jpg"}
        assert (site / info["thumb"]).exists()
    chunks = [_load_js(site / "data" / f"concepts_{c}.js") for c in (0, 1)]
    assert [c["chunk"] for c in chunks] == [0, 1]
    ids = [int(k) for c in chunks for k in c["concepts"]]
    assert ids == list(range(96)) and not (site / "data" / "concepts_2.js").exists()
    shown = {r for c in chunks for e in c["concepts"].values() for r in e["images"]}
    assert shown == {int(r) for r in ov["images"]}
    cam = chunks[0]["concepts"][str(CAM_CONCEPT)]
    assert cam["cam"] == {m: f"cam/{CAM_CONCEPT}/{m}.png" for m in models}
    assert all((site / p).exists() for p in [*cam["cam"].values(), *cam["cam_alpha"].values()])
    assert "cam" not in chunks[0]["concepts"][str(CAM_CONCEPT + 1)]


def _hand_site(root: Path, n: int = 450) -> dict:
    """A site whose data are written here by hand: n concepts of two models, five classes in
    turn, every 7th energy missing, two data chunks of three, no plots, no faithfulness, a
    truth section; returns the overview."""
    from usae.explorer.build import STATIC

    root.mkdir(parents=True)
    for f in STATIC.iterdir():
        shutil.copy(f, root / f.name)
    if os.environ.get("USAE_TEST_APP_JS"):  # scripts/mutation_js.py: the mutant under test
        shutil.copy(os.environ["USAE_TEST_APP_JS"], root / "app.js")
    (root / "data").mkdir()
    kinds = ["universal", "specific:a", "specific:b", "mixed", "dead"]
    table = {"energy": [None if k % 7 == 3 else round((k * 37 % 101) / 10, 2) for k in range(n)],
             "firing_entropy": [0.5] * n, "cofires": [k % 5 for k in range(n)],
             "class": [kinds[k % 5] for k in range(n)],
             "fires_a": [k % 3 for k in range(n)], "fires_b": [1] * n,
             "cfp_a": [None] * n, "cfp_b": [0.25] * n}
    overview = {
        "run": "hand", "models": ["a", "b"], "grid": [2, 2], "chunk": 64, "n_concepts": n,
        "top": 2, "plots": [], "table": table, "images": {"5": {"name": "five.jpg",
                                                                "label": None, "thumb": None}},
        "report": {"summary": {"self_r2_mean": 0.5, "cross_r2_mean": None,
                               "jaccard_cross_mean": 0.125},
                   "concept_classes": {"universal": 90, "model_specific": {"a": 90, "b": 90},
                                       "never_fire": 90, "thresholds": {
                                           "universal_fe_at_least": 0.7,
                                           "model_specific_fe_at_most": 0.2}},
                   "n_tokens": 1234567, "split": "val", "r2": [[0.5, 0.25], [0.125, 0.5]],
                   "faithfulness": None,
                   "truth": {"recovery": {"a": 0.95, "b": 0.5}, "shared_as_one": None,
                             "specific_detected": 0.5, "mcc_mean": 0.25,
                             "spurious": {"count": 3, "firing": 40}}}}
    (root / "data" / "overview.js").write_text(f"window.USAE_OVERVIEW = {json.dumps(overview)};")
    for c in (0, 2):  # chunk 1 is missing on purpose
        concepts = {}
        for k in range(64 * c, 64 * c + 64):
            full = 255 if k % 2 else 0  # one value on every token: 255 or nothing at all
            maps = {m: base64.b64encode(bytes([full] * 4)).decode()
                    for m in ("a", "b")}
            concepts[str(k)] = {"images": [5], "rankings": {"mean": [5], "a": [5], "b": []},
                                "scale": 2.0, "maps": maps}
        _write_chunk(root, c, concepts)
    return overview


def _write_chunk(site: Path, c: int, concepts: dict) -> None:
    """``data/concepts_<c>.js`` of a site, as the builder writes it."""
    (site / "data" / f"concepts_{c}.js").write_text(
        f"USAE_CHUNK({json.dumps({'chunk': c, 'concepts': concepts})});")


def _open_page(browser):
    """A page of the tests' size and time-out, and the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


@pytest.mark.browser
def test_the_app_pages_sorts_filters_and_loads_chunks_on_hand_written_data(tmp_path, chromium):
    """Behaviour no trained run shows: more concepts than a page, missing values, every class,
    a truth section, chunks loaded on demand and one that is missing, a tile without a
    thumbnail, the heatmap's two ends (no activation: the tile's grey shows through; full:
    red at two thirds opacity), and a site without its overview."""
    ov = _hand_site(tmp_path / "site")
    table, n = ov["table"], ov["n_concepts"]
    page, errors = _open_page(chromium)
    try:
        page.goto((tmp_path / "site" / "index.html").as_uri())
        page.wait_for_selector("#concepts tr[data-concept]")
        texts = lambda sel: page.eval_on_selector_all(sel, "es => es.map(e => e.textContent)")  # noqa: E731
        shown = lambda: [int(x) for x in page.eval_on_selector_all(  # noqa: E731
            "#concepts tr[data-concept]", "rs => rs.map(r => r.dataset.concept)")]
        energy = [-math.inf if v is None else v for v in table["energy"]]
        order = sorted(range(n), key=lambda k: (-energy[k], k))
        assert texts(".card .v") == ["0.500", "—", "90", "180", "90", "1,234,567", "0.125",
                                     "0.950", "0.500", _words()["not_available"], "50%",
                                     "0.250", "3 / 40"]
        words = _words()
        assert texts(".card .k")[7:] == ["recovery in a (mean best cosine)",
                                         "recovery in b (mean best cosine)",
                                         words["shared_as_one"], words["specific_detected"],
                                         words["mcc"], words["spurious"]]
        assert texts("h2") == [words["r2_matrix"], words["truth"], words["concepts"]]
        assert page.locator("table.faithfulness").count() == 0
        assert "Plots" not in texts("h2")
        styled = _styled_classes() | TEST_HOOKS
        facts = _page_facts(page)  # the truth section's elements and classes too
        assert facts["unknown"] == [] and set(facts["classes"]) <= styled, facts
        assert page.locator(".cards").count() == 2 and page.locator(".cards .card").count() == 13
        # pages of 200: 450 concepts make three, the last of 50
        assert shown() == order[:200]
        assert page.text_content(".pager span") == "page 1 of 3 · 450 concepts"
        prev, nxt = page.locator(".pager button >> nth=0"), page.locator(".pager button >> nth=1")
        assert prev.is_disabled() and not nxt.is_disabled()
        nxt.click()
        assert shown() == order[200:400] and not prev.is_disabled()
        assert page.text_content(".pager span") == "page 2 of 3 · 450 concepts"
        page.locator(".pager button >> nth=1").click()
        assert shown() == order[400:]
        page.locator(".pager button >> nth=1").click()  # no fourth page
        assert page.text_content(".pager span") == "page 3 of 3 · 450 concepts"
        page.locator(".pager button >> nth=0").click()
        assert page.text_content(".pager span") == "page 2 of 3 · 450 concepts"
        page.locator(".pager button >> nth=0").click()
        assert page.text_content(".pager span") == "page 1 of 3 · 450 concepts"
        page.locator(".pager button >> nth=1").click()
        page.click("th[data-key=id]")  # a new sort starts again at page 1, ids ascending
        assert shown() == list(range(200))
        assert page.get_attribute("th[data-key=id]", "class") == "sorted asc"
        page.click("th[data-key=id]")
        assert shown() == list(range(n - 1, n - 201, -1))
        assert page.get_attribute("th[data-key=id]", "class") == "sorted"
        row = texts("#concepts tr[data-concept='449'] td")
        assert row == ["#449", "—" if table["energy"][449] is None else f"{energy[449]:.3f}",
                       "0.500", "4", "2", "1", "—", "0.250", "dead"]
        page.select_option("#filter", "specific")
        assert sorted(shown()) == [k for k in range(n) if k % 5 in (1, 2)]
        assert set(texts("td.cls")) == {"only a", "only b"}
        assert page.text_content(".pager span") == "page 1 of 1 · 180 concepts"
        # concepts load from their chunk when opened; a missing chunk says which file
        page.goto((tmp_path / "site" / "index.html").as_uri() + "#/concept/129")
        page.wait_for_selector(".row[data-model] canvas")
        assert texts(".tile .cap") == ["five.jpg"] * 2  # no label: the name alone
        assert page.get_attribute(".row[data-model=a] canvas", "aria-label") == \
            "a heatmap on five.jpg"
        facts = _page_facts(page)
        assert facts["unknown"] == [] and set(facts["classes"]) <= styled, facts
        assert page.eval_on_selector_all(".row[data-model]", "rs => rs.map(r => [r.dataset."
                                         "model, [...r.querySelectorAll('.tile')].map(t => "
                                         "t.dataset.model)])") == [["a", ["a"]], ["b", ["b"]]]
        # the canvas is the tile's 128 px square, the overlay covers it to its corners
        corners = "c => [[0, 0], [127, 127], [0, 127], [127, 0], [64, 64]].map(([x, y]) => " \
            "[...c.getContext('2d').getImageData(x, y, 1, 1).data])"
        grey = (0x9a, 0xa1, 0xad)  # the fill of a tile without a thumbnail
        red, alpha = (200, 0, 0), 170 / 255
        size = page.eval_on_selector(".row[data-model=a] canvas", "c => [c.width, c.height]")
        assert size == [128, 128]
        for full in page.eval_on_selector(".row[data-model=a] canvas", corners):
            assert full[:3] == pytest.approx([g * (1 - alpha) + r * alpha
                                              for g, r in zip(grey, red)], abs=2)
            assert full[3] == 255
        assert page.locator(".row[data-model=b] .tile").count() == 1  # the mean ranking
        page.goto((tmp_path / "site" / "index.html").as_uri() + "#/concept/128")
        page.wait_for_selector(".row[data-model] canvas")
        page.wait_for_timeout(50)
        for none in page.eval_on_selector(".row[data-model=a] canvas", corners):
            assert none == [*grey, 255]  # a token that does not fire leaves the tile as it was
        page.goto((tmp_path / "site" / "index.html").as_uri() + "#/concept/70")
        page.wait_for_function("document.querySelector('p.empty') && document.querySelector("
                               "'p.empty').textContent.startsWith('cannot')")
        assert page.text_content("p.empty") == "cannot load data/concepts_1.js"
        # a site without its overview says how to make one
        (tmp_path / "site" / "data" / "overview.js").unlink()
        page.goto((tmp_path / "site" / "index.html").as_uri())
        page.wait_for_selector("p.empty")
        assert page.text_content("p.empty") == words["no_overview"]
        assert not errors, errors
    finally:
        page.context.close()


def _lut() -> list[int]:
    """The heatmap's colour scale, byte by byte (RGBA for each map value 0..255): red 255
    fading to 200 above 60 %, green 230 fading to 0 at 1/1.1, no blue, and an opacity of
    170·sqrt(t), each stored as Uint8ClampedArray stores (rounded half to even)."""
    out = []
    for i in range(256):
        t = i / 255
        out += [round(255 - 55 * max(0.0, t - 0.6) / 0.4), round(230 * max(0.0, 1 - t * 1.1)),
                0, round(170 * math.sqrt(t))]
    return out


@pytest.mark.browser
def test_the_colour_scale_and_the_keys_on_hand_written_data(tmp_path, chromium):
    """Every value of the heatmap's colour scale, and a tile of one value composited over the
    grey of a tile without a thumbnail; the keys that must not move (in a text field, with a
    modifier, at either end) and an empty search."""
    _hand_site(tmp_path / "site")
    values = [0, 30, 100, 153, 200, 254]
    concepts = {str(k): {"images": [5], "rankings": {"mean": [5], "a": [5], "b": [5]},
                         "scale": 1.0, "maps": {m: base64.b64encode(bytes([v] * 4)).decode()
                                                for m in ("a", "b")}}
                for k, v in enumerate(values)}
    _write_chunk(tmp_path / "site", 0, concepts)
    url = (tmp_path / "site" / "index.html").as_uri()
    page, errors = _open_page(chromium)
    try:
        page.goto(url + "#/concept/0")
        page.wait_for_selector(".row[data-model] canvas")
        assert page.evaluate("Array.from(LUT)") == _lut()
        lut = _lut()
        grey = (0x9a, 0xa1, 0xad)
        for k, v in enumerate(values):
            page.goto(url + f"#/concept/{k}")
            page.wait_for_function(f"document.querySelector('#concept-title') && document."
                                   f"querySelector('#concept-title').textContent.startsWith("
                                   f"'Concept #{k} ')")
            page.wait_for_selector(".row[data-model=b] canvas")
            page.wait_for_timeout(30)
            pixels = page.eval_on_selector(
                ".row[data-model=b] canvas", "c => [[0, 0], [127, 127], [64, 20]].map(([x, y])"
                " => [...c.getContext('2d').getImageData(x, y, 1, 1).data])")
            alpha = lut[4 * v + 3] / 255
            want = [g * (1 - alpha) + c * alpha for g, c in zip(grey, lut[4 * v:4 * v + 3])]
            for px in pixels:
                assert px[:3] == pytest.approx(want, abs=2) and px[3] == 255, (v, px)
        # the keys: at the first concept there is no previous one
        page.goto(url + "#/concept/0")
        page.wait_for_selector(".nav a")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("k")
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == "#/concept/0"
        # in the search field, and with a modifier, a key is not a command
        page.focus("#goto")
        page.keyboard.press("j")
        page.keyboard.press("Escape")
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == "#/concept/0"
        page.evaluate("document.activeElement.blur()")
        for chord in ("Control+j", "Meta+j", "Control+ArrowRight"):
            page.keyboard.press(chord)
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == "#/concept/0"
        page.keyboard.press("j")
        page.wait_for_function("location.hash === '#/concept/1'")
        # an empty search goes nowhere; a number goes to its concept
        page.fill("#goto", "")
        page.press("#goto", "Enter")
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == "#/concept/1"
        page.fill("#goto", "0")
        page.press("#goto", "Enter")
        page.wait_for_function("location.hash === '#/concept/0'")
        # on the overview, a key pressed in the filter stays in the filter
        page.goto(url)
        page.wait_for_selector("#filter")
        page.focus("#filter")
        page.keyboard.press("u")
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == ""
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("u")
        page.wait_for_function("location.hash === '#/'")
        assert not errors, errors
    finally:
        page.context.close()


@pytest.mark.browser
def test_the_last_concept_the_scroll_a_dead_concept_and_cam_checks_on_hand_written_data(
        tmp_path, chromium):
    """The next-concept key stops at the last concept; a new view starts at the top; a
    concept that never fires says so in the page's message style; the loading message is a
    message too; a CAM section without transparency maps shows no placeholder, and its
    checks name each model's cell."""
    _hand_site(tmp_path / "site")
    dot = "data:image/png;base64," + base64.b64encode(_png_1x1()).decode()
    concepts = {
        "0": {"images": [5], "rankings": {"mean": [], "a": [], "b": []}, "scale": 1.0,
              "maps": {m: base64.b64encode(bytes(4)).decode() for m in ("a", "b")}},
        "1": {"images": [5], "rankings": {"mean": [5], "a": [5], "b": [5]}, "scale": 1.0,
              "maps": {m: base64.b64encode(bytes(4)).decode() for m in ("a", "b")},
              "cam": {"a": dot, "b": dot},
              "cam_checks": {"self_ratio": {"a": 1.5, "b": 0.25}, "transfer": [[1, 2], [3, 4]],
                             "transfer_control": [[0, 0], [0, 0]], "control_concept": 9,
                             "transfer_offdiag_mean": 2.5, "transfer_control_offdiag_mean": 0}},
    }
    _write_chunk(tmp_path / "site", 0, concepts)
    url = (tmp_path / "site" / "index.html").as_uri()
    words = _words()
    page, errors = _open_page(chromium)
    try:
        # the next-concept key: from 448 to 449, the last, and no further
        page.goto(url + "#/concept/448")
        page.wait_for_selector("p.empty")
        page.keyboard.press("ArrowRight")
        page.wait_for_function("location.hash === '#/concept/449'")
        page.keyboard.press("j")
        page.wait_for_timeout(50)
        assert page.evaluate("location.hash") == "#/concept/449"
        # a view starts at the top: the overview scrolled down, a concept, the overview again
        page.goto(url)
        page.wait_for_selector("#concepts tr[data-concept]")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        assert page.evaluate("window.scrollY") > 500
        page.evaluate("location.hash = '#/concept/1'")
        page.wait_for_selector(".row[data-model] canvas")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.evaluate("location.hash = '#/'")
        page.wait_for_selector("#concepts tr[data-concept]")
        assert page.evaluate("[window.scrollX, window.scrollY]") == [0, 0]
        # the loading message and a dead concept's message: each a <p class="empty">
        page.evaluate("""() => { window.seen = [];
            new MutationObserver((ms) => ms.forEach((m) => m.addedNodes.forEach((n) =>
                window.seen.push([n.tagName, n.className, n.textContent]))))
            .observe(document.getElementById('app'), {childList: true}); }""")
        page.evaluate("location.hash = '#/concept/0'")
        page.wait_for_function("document.querySelector('#app p.empty') && document."
                               "querySelector('#app p.empty').textContent.startsWith('This')")
        assert page.text_content("#app p.empty") == words["dead"]
        seen = page.evaluate("window.seen")
        assert ["P", "empty", "Loading concept 0…"] in seen
        assert ["P", "empty", words["dead"]] in seen
        # CAM without transparency maps: an image and a caption per model, nothing else
        page.goto(url + "#/concept/1")
        page.wait_for_selector(".tile.cam")
        assert page.eval_on_selector_all(".tile.cam", "ts => ts.map(t => [t.dataset.model, "
                                         "t.children.length, t.textContent])") == \
            [["a", 2, "a"], ["b", 2, "b"]]
        assert page.text_content("td[data-model=a]") == "a 1.50"
        assert page.text_content("td[data-model=b]") == "b 0.25"
        assert page.eval_on_selector(f"tr:has(th:text-is('{words['self_ratio']}'))",
                                     "r => r.children.length") == 3
        assert not errors, errors
    finally:
        page.context.close()


def _png_1x1() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()
