"""The explorer in a real browser (Debian's Chromium driven by Playwright), from file:// and
through ``usae serve``."""

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    rng = np.random.default_rng(0)
    for i in range(24):
        label = XSS if i % 3 == 0 else f"class{i % 3}"
        path = root / "imgs" / label / f"img{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (1, 1, 3))
        grad = np.linspace(0, 1, 96)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base * 0.5 + grad + rng.normal(0, 20, (96, 96, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(path)
    cache("effnet:lite0?img_size=128&name=lite0,effnet:lite1?img_size=128&name=lite1",
          root / "imgs", root / "store", workers=0, progress=False)
    store = Store(root / "store")
    cfg = resolve(store.models, store.dims, "demo", {"n_concepts": 96, "k": 4,
                                                     "batch_images": 4, "max_steps": 60})
    train_run(cfg, StoreSource(store, "train"), root / "run", progress=False)
    evaluate(root / "run", root / "store", root / "eval", split="all", progress=False)
    run_cam(root / "run", root / "store", [CAM_CONCEPT], eval_dir=root / "eval", steps=3,
            size=48, crops=1, progress=False)
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


def _launch(pw):
    return pw.sync_playwright().start(), [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_explorer_from_file_and_from_serve(explorer, tmp_path):
    pw = _browser()
    p, args = _launch(pw)
    try:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
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
        browser.close()
    finally:
        p.stop()


@pytest.mark.browser
def test_overview_shows_the_faithfulness_table_cell_by_cell(explorer):
    """Each cell, recomputed from report.json here: top-1 agreement in % / KL recovered."""
    report = json.loads((explorer / "eval" / "report.json").read_text())
    f = report["faithfulness"]

    def cell(a, k):
        return "n/a" if a is None or k is None else f"{100 * a:.1f}% / {k:.3f}"

    want = [cell(f["top1_agreement"][i][j], f["kl_recovered"][i][j])
            for i in range(2) for j in range(2)]
    want += [cell(f["resample_only"][m]["top1_agreement"], f["resample_only"][m]["kl_recovered"])
             for m in ("lite0", "lite1")]
    pw = _browser()
    p, args = _launch(pw)
    try:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((explorer / "site" / "index.html").as_uri())
        page.wait_for_selector("table.faithfulness td")
        cells = page.eval_on_selector_all("table.faithfulness td",
                                          "tds => tds.map(t => t.textContent)")
        assert cells == want
        browser.close()
    finally:
        p.stop()
    overview = (explorer / "site" / "data" / "overview.js").read_text()
    assert str(explorer) not in overview  # the run's path is not in the shared site


@pytest.mark.browser
def test_concept_page_shows_cam_images_alpha_maps_and_checks(explorer):
    pw = _browser()
    p, args = _launch(pw)
    try:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((explorer / "site" / "index.html").as_uri() + f"#/concept/{CAM_CONCEPT}")
        page.wait_for_selector(".cams .tile.cam img")
        page.wait_for_function("[...document.querySelectorAll('.cams img')].every(i => "
                               "i.complete && i.naturalWidth > 0)")
        assert page.eval_on_selector_all(".cams .tile.cam", "ts => ts.map(t => "
                                         "t.dataset.model)") == ["lite0", "lite1"]
        assert page.eval_on_selector_all(".cams img.alpha", "els => els.length") == 2
        doc = json.loads((explorer / "run" / "cam" / str(CAM_CONCEPT) / "cam.json").read_text())
        cells = page.eval_on_selector_all(".camchecks td", "tds => tds.map(t => t.textContent)")
        assert cells == [f"{m} {doc['self_ratio'][m]:.2f}" for m in ("lite0", "lite1")]
        transfer = page.eval_on_selector_all(
            "table.transfer[data-kind=transfer] td", "tds => tds.map(t => t.textContent)")
        assert transfer == [f"{v:.2f}" for row in doc["transfer"] for v in row]
        assert page.locator("table.transfer").count() == 2  # the matrix and its control
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "concept_cam.png"), full_page=True)
        browser.close()
    finally:
        p.stop()


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
