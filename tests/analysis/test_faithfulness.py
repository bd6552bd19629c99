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
    from conftest import cache_and_train, write_noise_images

    root = tmp_path_factory.mktemp("faith")
    write_noise_images(root / "imgs", 12, shape=(72, 72))
    return cache_and_train(root, f"{LITE},{VIT}", "fast", {"n_concepts": 64, "k": 8,
                                                           "batch_images": 3, "max_steps": 20},
                           val_fraction=0.25)


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
