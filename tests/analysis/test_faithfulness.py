"""Faithfulness through each model's own head, pinned by independent oracles (CPU, small)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from usae.analysis.faithfulness import kl_divergence, measure
from usae.cli import main
from usae.config import resolve
from usae.data.backbones import build_backbone
from usae.data.sources import StoreSource
from usae.sae.model import UniversalSAE
from usae.sae.training import train_run
from usae.store.store import Store
from usae.store.writer import store_from_arrays

LITE = "effnet:lite0?img_size=64&name=lite0"
VIT = "timm:vit_tiny_patch16_224?img_size=64&pretrained=0&name=vit"


def plain_forward(b, px: torch.Tensor) -> torch.Tensor:
    """The module's own forward, with the adapter's early-stop hook (if any) switched off."""
    hook = getattr(b, "_hook", None)
    if hook is None:
        return b.module(px)
    hook.stop = False
    try:
        return b.module(px)
    finally:
        hook.stop = True


def _pixels(b, n=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *b.preprocess.crop, generator=g) * 2 - 1


@pytest.mark.parametrize("spec", [LITE, VIT, "timm:resnet18?pretrained=0&img_size=64"])
def test_splicing_the_unmodified_tokens_is_the_models_own_forward(spec):
    """rest(tokens) on the layer's own output equals module(pixels) bit for bit: top-1
    agreement 1 and KL 0, exactly."""
    b = build_backbone(spec)
    px = _pixels(b)
    with torch.no_grad():
        tokens, rest = b.splicer(px)
        spliced, plain = rest(tokens), plain_forward(b, px)
    assert torch.equal(spliced, plain)
    assert torch.equal(kl_divergence(plain, spliced), torch.zeros(len(px), dtype=torch.float64))
    assert tokens.shape == (len(px), b.n_prefix + b.grid[0] * b.grid[1], b.d)


def test_the_mean_ablation_equals_a_plain_forward_hook():
    """Replacing the layer by a constant map through ``splicer`` gives the logits that a
    plain forward hook on the real module gives; KL checked against NumPy."""
    b = build_backbone(LITE)
    px = _pixels(b, n=2, seed=1)
    mean_d = torch.linspace(-0.5, 0.5, b.d)
    layer = dict(b.module.named_modules())[b.layer]
    b._hook.stop = False  # the adapter's own stop hook must not end the plain forward

    def constant(_m, _inp, out):
        return mean_d.view(1, -1, 1, 1).expand_as(out).contiguous()

    with torch.no_grad():
        handle = layer.register_forward_hook(constant)
        try:
            want = b.module(px)
        finally:
            handle.remove()
            b._hook.stop = True
        orig_tokens, rest = b.splicer(px)
        got = rest(mean_d.expand(orig_tokens.shape).contiguous())
        orig = rest(orig_tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    p = np.exp(orig.double().numpy() - orig.double().numpy().max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(got.double().numpy() - got.double().numpy().max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    naive = (p * (np.log(p) - np.log(q))).sum(1)
    np.testing.assert_allclose(kl_divergence(orig, got).numpy(), naive, rtol=1e-6)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    from conftest import cache_and_train, prebuilt, write_noise_images

    root = tmp_path_factory.mktemp("faith")

    def build(dest):
        write_noise_images(dest / "imgs", 12, shape=(72, 72))
        cache_and_train(dest, f"{LITE},{VIT}", "fast", {"n_concepts": 64, "k": 8,
                                                        "batch_images": 3, "max_steps": 20},
                        val_fraction=0.25)

    prebuilt("faith-cached", root, build)  # (cache and train: no faithfulness code)
    return root


def test_measure_on_two_real_backbones(cached):
    """Every cell is a probability and a KL; kl_recovered = 1 - kl / kl_ablation; where the
    model's grid is the aligned grid, mapping it there and back changes nothing."""
    store = Store(cached / "store")
    sae = UniversalSAE.load(cached / "run")
    f = measure(sae, store, store.rows("val"), batch_images=2, progress=False)
    assert f["models"] == ["lite0", "vit"] and f["n_images"] == len(store.rows("val"))
    assert f["heads"] == {"lite0": "effnet:lite0?img_size=64&name=lite0", "vit": VIT}
    agree, kl, rec = (np.asarray(f[k], dtype=float) for k in
                      ("top1_agreement", "kl", "kl_recovered"))
    assert ((agree >= 0) & (agree <= 1)).all() and (kl >= 0).all()
    abl = np.asarray([f["kl_ablation"][m] for m in f["models"]])
    np.testing.assert_allclose(rec[:, 0], 1 - kl[:, 0] / abl[0], atol=2e-5)
    # the ViT's head pools its CLS token: its final patch tokens never reach the logits, so
    # no ablation changes them and "recovered" is undefined (null), never a division by 0
    assert abl[1] == 0.0 and (kl[:, 1] == 0).all()
    assert [row[1] for row in f["kl_recovered"]] == [None, None]
    aligned = {m: store.manifest["models"][m]["aligned_grid"] for m in f["models"]}
    native = {m: store.manifest["models"][m]["grid"] for m in f["models"]}
    for m in f["models"]:
        if aligned[m] == native[m]:
            assert f["resample_only"][m] == {"top1_agreement": 1.0, "kl": 0.0,
                                             "kl_recovered": 1.0}


def test_eval_writes_the_section_and_can_skip_it(cached, tmp_path, capsys):
    base = ["eval", str(cached / "run"), "--store", str(cached / "store"), "--no-plots"]
    assert main(base + ["--out", str(tmp_path / "e1")]) == 0
    out = capsys.readouterr().out
    assert "faithfulness through each model's head" in out and "grid only" in out
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert "kl_recovered_cross" in report["summary"]
    assert main(base + ["--out", str(tmp_path / "e3"), "--compare", str(cached / "run")]) == 0
    out = capsys.readouterr().out
    assert "compared run 0-run:" in out and out.count("faithfulness through") == 2
    rows = json.loads((tmp_path / "e3" / "report.json").read_text())["comparison"]
    assert rows[0]["kl_recovered_self"] == rows[1]["kl_recovered_self"]  # the same run twice
    assert main(base + ["--out", str(tmp_path / "e2"), "--no-faithfulness"]) == 0
    assert "faithfulness" not in json.loads((tmp_path / "e2" / "report.json").read_text())


def test_stores_without_backbones_are_skipped_with_the_reason(arrays, tmp_path):
    store_from_arrays(tmp_path / "s", arrays)
    store = Store(tmp_path / "s")
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 16, "k": 2,
                                                      "batch_images": 8, "max_steps": 2})
    train_run(cfg, StoreSource(store, "train"), tmp_path / "run", progress=False)
    f = measure(UniversalSAE.load(tmp_path / "run"), store, store.rows("all"), progress=False)
    assert "no backbone spec" in f["skipped"]


# ---- every cell against a forward hook that puts the reconstruction into the layer ---------
def _hand_cells(sae, store, rows, target):
    """For target model ``target`` (a conv net: its layer's output is (B, d, h, w)): the
    top-1 agreement and mean KL of each source's reconstruction, of the mean ablation and of
    the grid mapping alone, from the module's own forward with a hook on the layer."""
    from usae.data.align import resample_tokens
    from usae.data.backbones import rebuild_cached
    from usae.data.images import load_rgb, preprocess_image

    info = store.manifest["models"][target]
    b = rebuild_cached(target, store.model(target).as_manifest())
    px = torch.stack([preprocess_image(load_rgb(store.manifest["images"][int(r)]["path"]),
                                       b.preprocess) for r in rows])
    layer = dict(b.module.named_modules())[b.layer]
    h, w = b.grid
    aligned = tuple(info["aligned_grid"])

    def forward_with(tokens_btd):
        fmap = tokens_btd.transpose(1, 2).reshape(len(rows), b.d, h, w).contiguous()
        handle = layer.register_forward_hook(lambda _m, _i, out: fmap)
        b._hook.stop = False
        try:
            return b.module(px)
        finally:
            handle.remove()
            b._hook.stop = True

    def cells(new):
        agree = (new.argmax(1) == orig.argmax(1)).double().mean()
        p = torch.log_softmax(orig.double(), 1)
        q = torch.log_softmax(new.double(), 1)
        return float(agree), float((p.exp() * (p - q)).sum(1).mean())

    with torch.no_grad():
        orig = plain_forward(b, px)
        own = b.splicer(px)[0]
        out = {"ablation": cells(forward_with(
            torch.from_numpy(np.asarray(store.stats()[target].mean_d)).float().expand(
                len(rows), h * w, -1)))}
        out["grid only"] = cells(forward_with(resample_tokens(resample_tokens(
            own[:, b.n_prefix:], b.grid, aligned), aligned, b.grid)))
        for src in sae.models:
            x = store.read(src, rows).float()
            code = sae.encode(src, x.reshape(-1, x.shape[-1]))
            x_hat = sae.decode(target, code).reshape(len(rows), -1, info["d"])
            out[src] = cells(forward_with(resample_tokens(x_hat, aligned, b.grid)))
    return out


def test_each_cell_is_what_a_forward_hook_on_the_layer_gives(cached):
    store = Store(cached / "store")
    sae = UniversalSAE.load(cached / "run")
    rows = store.rows("val")
    f = measure(sae, store, rows, batch_images=1, progress=False)  # one image a batch
    hand = _hand_cells(sae, store, rows, "lite0")
    for i, src in enumerate(f["models"]):
        assert f["top1_agreement"][i][0] == pytest.approx(hand[src][0], abs=1e-5)
        assert f["kl"][i][0] == pytest.approx(hand[src][1], abs=2e-5)
    assert f["kl_ablation"]["lite0"] == pytest.approx(hand["ablation"][1], abs=2e-5)
    assert f["resample_only"]["lite0"]["top1_agreement"] == pytest.approx(
        hand["grid only"][0], abs=1e-5)
    assert f["resample_only"]["lite0"]["kl"] == pytest.approx(hand["grid only"][1], abs=2e-5)
    for value in (*f["kl"][0], *f["kl"][1], *f["kl_ablation"].values()):
        assert value is None or value == round(value, 5)  # the report keeps five places


def test_batches_add_up_to_the_whole(cached):
    store = Store(cached / "store")
    sae = UniversalSAE.load(cached / "run")
    one = measure(sae, store, store.rows("val"), batch_images=1, progress=False)
    whole = measure(sae, store, store.rows("val"), batch_images=64, progress=False)
    assert _close(one, whole)


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 2e-5
    return a == b


def test_max_images_and_a_missing_image_after_the_first(cached, tmp_path):
    import shutil

    store = Store(cached / "store")
    sae = UniversalSAE.load(cached / "run")
    rows = store.rows("all")
    assert measure(sae, store, rows, max_images=2, progress=False)["n_images"] == 2
    second = store.manifest["images"][int(rows[1])]["path"]
    shutil.copy(second, tmp_path / "kept")
    try:
        import os

        os.remove(second)
        f = measure(sae, store, rows[:3], progress=False)
        assert f["n_images"] == 2  # the missing image is left out, the others measured
    finally:
        shutil.copy(tmp_path / "kept", second)


def test_the_progress_bar_counts_images(cached, progress_bars):
    from usae.analysis import faithfulness

    bars = progress_bars(faithfulness)
    store = Store(cached / "store")
    sae = UniversalSAE.load(cached / "run")
    measure(sae, store, store.rows("val"), batch_images=2)
    n = len(store.rows("val"))
    assert bars[0].kw == {"total": n, "desc": "faithfulness", "unit": "img", "disable": False}
    assert bars[0].n == n and bars[0].closed
    measure(sae, store, store.rows("val"), progress=False)
    assert bars[1].kw["disable"] is True


def test_a_model_that_keeps_its_cls_token_is_measured_on_its_patch_tokens(tmp_path):
    from conftest import write_noise_images

    from usae.data.cache import cache

    write_noise_images(tmp_path / "imgs", 4, shape=(72, 72))
    cache(VIT, tmp_path / "imgs", tmp_path / "store", workers=0, progress=False, keep_cls=True)
    store = Store(tmp_path / "store")
    assert store.model("vit").info["keep_cls"] is True
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 32, "k": 4})
    sae = UniversalSAE(cfg.sae).eval()
    f = measure(sae, store, store.rows("all"), batch_images=2, progress=False)
    assert f["n_images"] == 4 and f["models"] == ["vit"]
    assert f["resample_only"]["vit"]["top1_agreement"] == 1.0


class _Spec:
    def __init__(self, spec):
        self.spec = spec


def test_the_section_divides_by_each_targets_images_and_rounds():
    from usae.analysis.faithfulness import SPLICED, _section, _Sums

    s = _Sums(2)
    s.n[:] = [4, 0]  # b has no head: nothing was measured for it
    s.agree[:, 0] = [3, 2]
    s.kl[:, 0] = [0.4, 1.0]
    s.abl[0] = 3.0
    s.res_agree[0], s.res_kl[0] = 4, 0.1234567
    got = _section(["a", "b"], {"a": _Spec("effnet:a")}, s)
    assert got == {
        "models": ["a", "b"], "n_images": 4, "spliced": SPLICED,
        "heads": {"a": "effnet:a", "b": None},
        "top1_agreement": [[0.75, None], [0.5, None]],
        "kl": [[0.1, None], [0.25, None]],
        "kl_recovered": [[0.86667, None], [0.66667, None]],  # 1 - 0.1 / 0.75, 1 - 0.25 / 0.75
        "kl_ablation": {"a": 0.75, "b": None},
        "resample_only": {"a": {"top1_agreement": 1.0, "kl": 0.03086,
                                "kl_recovered": 0.95885},  # 1 - 0.03086 / 0.75
                          "b": {"top1_agreement": None, "kl": None, "kl_recovered": None}}}
    s.abl[0] = 0.0  # no ablation effect (a head that pools the CLS token): undefined
    assert _section(["a", "b"], {"a": _Spec("x")}, s)["kl_recovered"][0] == [None, None]
    s.res_kl[0] = 1 / 3 * 4
    assert _section(["a", "b"], {"a": _Spec("x")}, s)["resample_only"]["a"]["kl"] == 0.33333


def test_format_table_lays_out_each_source_and_target():
    from usae.analysis.faithfulness import format_table

    section = {"models": ["ab", "c"], "n_images": 7,
               "top1_agreement": [[1.0, 0.5], [0.25, None]],
               "kl_recovered": [[0.98765, -0.5], [None, 0.125]],
               "resample_only": {"ab": {"top1_agreement": 1.0, "kl_recovered": 1.0},
                                 "c": {"top1_agreement": None, "kl_recovered": None}},
               "kl_ablation": {"ab": 2.5, "c": None}}
    assert format_table(section).split("\n") == [
        "  faithfulness through each model's head (7 images; row: source code, column: target "
        "model; top-1 agreement / KL recovered):",
        " " * 6 + " " * 20 + "ab" + " " * 21 + "c",
        "  ab  " + "      100.0% /  0.988" + "       50.0% / -0.500",
        "  c   " + "       25.0% /    n/a" + "         n/a /  0.125",
        "  grid only" + "      100.0% /  1.000" + "         n/a /    n/a",
        "  ablation KL" + " " * 16 + " 2.500" + " " * 16 + "   n/a"]
    assert format_table({"skipped": "no head"}) == "  faithfulness: skipped (no head)"


def test_heads_keeps_the_models_with_a_head_and_says_why_the_others_have_none(monkeypatch):
    from types import SimpleNamespace

    from usae.analysis import faithfulness

    built = {"b": SimpleNamespace(has_head=False, spec="hf:b"),
             "c": SimpleNamespace(has_head=True, spec="effnet:c")}
    asked = []

    def rebuild(name, info):
        asked.append((name, info))
        if name not in built:
            raise faithfulness.UsaeError(f"{name}: no backbone spec")
        return built[name]

    monkeypatch.setattr(faithfulness, "rebuild_cached", rebuild)
    store = SimpleNamespace(model=lambda m: SimpleNamespace(as_manifest=lambda: {"of": m}))
    sae = SimpleNamespace(models=("a", "b", "c"))
    assert faithfulness.heads(sae, store) == ({"c": built["c"]}, None)
    assert asked == [("a", {"of": "a"}), ("b", {"of": "b"}), ("c", {"of": "c"})]
    sae.models = ("a", "b")
    assert faithfulness.heads(sae, store) == (
        {}, "a: no backbone spec; b: hf:b has no classification head")


def test_the_grid_only_cost_adds_up_over_batches_where_the_grids_differ(tmp_path, monkeypatch):
    """A stand-in model with a 4 x 4 grid over a store aligned to 2 x 2: its own tokens taken
    there and back lose detail, so the grid alone costs a positive KL. Two batches of two
    images give the mean of the four images' KL, each worked out here."""
    from types import SimpleNamespace

    from usae.analysis import faithfulness
    from usae.config import SAEConfig
    from usae.data.align import resample_tokens
    from usae.files import atomic_write_json

    rng = np.random.default_rng(0)
    store = store_from_arrays(tmp_path / "s", {"a": rng.normal(size=(4, 4, 3))}, "float32")
    manifest = store.manifest
    manifest["models"]["a"]["aligned_grid"] = [2, 2]
    atomic_write_json(tmp_path / "s" / "manifest.json", manifest)
    store = Store(tmp_path / "s")
    sae = UniversalSAE(SAEConfig(models=("a",), dims=(3,), n_concepts=4, k=1))
    head = torch.from_numpy(rng.normal(size=(48, 5))).float()

    def rest(tokens_btd):
        return tokens_btd.reshape(len(tokens_btd), -1) @ head

    model = SimpleNamespace(name="a", spec="stand-in", grid=(4, 4), n_prefix=0,
                            splicer=lambda px: (px, rest))
    own = torch.from_numpy(rng.normal(size=(4, 16, 3))).float()  # each image's own tokens
    monkeypatch.setattr(faithfulness, "batch_pixels",
                        lambda items, backbones: {"a": torch.stack([px for _, px, _ in items])})
    sums = faithfulness._Sums(1)
    for rows in ([0, 1], [2, 3]):
        faithfulness._batch(sae, store, np.array(rows), [(r, own[r], None) for r in rows],
                            {"a": model}, {"a": torch.zeros(3)}, sums, "cpu")
    section = faithfulness._section(["a"], {"a": model}, sums)

    def kl(p_logits, q_logits):
        p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
        return float((p.exp() * (p - q)).sum())

    there_and_back = resample_tokens(resample_tokens(own, (4, 4), (2, 2)), (2, 2), (4, 4))
    want = np.mean([kl(rest(own[i:i + 1]), rest(there_and_back[i:i + 1])) for i in range(4)])
    assert want > 0.01
    assert section["resample_only"]["a"]["kl"] == pytest.approx(want, abs=1e-5)
    assert section["n_images"] == 4
