"""The explorer builder's parts by hand (no browser, no trained run): thumbnails of the region
the models saw, rankings, data files, CAM entries, and which eval ranks the images."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from usae.explorer import build


def _stripes(path, w: int, h: int, box: tuple[int, int, int, int]) -> None:
    """A red image with a green box (left, top, right, bottom) whose texture (seeded noise)
    tells one resampling filter from another."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 255
    left, top, right, bottom = box
    rng = np.random.default_rng(w * h)
    arr[top:bottom, left:right, 0] = rng.integers(0, 8, (bottom - top, right - left))
    arr[top:bottom, left:right, 1] = rng.integers(248, 256, (bottom - top, right - left))
    arr[top:bottom, left:right, 2] = 0
    Image.fromarray(arr).save(path)


@pytest.mark.parametrize("w, h, crop_frac, box", [
    # a wide image, a model input twice as tall as wide: the centre 50 x 100 of the 100 side
    (200, 100, (1.0, 0.5), (75, 0, 125, 100)),
    # a tall image, an input twice as wide as tall: the centre 100 x 50 of the 100 side
    (100, 240, (0.5, 1.0), (0, 95, 100, 145)),
    # a square input on a wide image: the centre square
    (160, 100, (1.0, 1.0), (30, 0, 130, 100)),
])
def test_a_thumbnail_is_the_centre_region_the_models_saw(tmp_path, w, h, crop_frac, box):
    """The region is worked out by hand: the shorter side, times the input's aspect, centred;
    inside it the image is green, outside red, so a thumbnail of the right region is green to
    its edges, bicubic-resized to 128 px and saved as a JPEG of quality 80."""
    src, dst = tmp_path / "src.png", tmp_path / "t.jpg"
    _stripes(src, w, h, box)
    assert build._thumbnail(str(src), dst, crop_frac) is True
    thumb = np.asarray(Image.open(dst).convert("RGB"), dtype=np.float64)
    assert thumb.shape == (128, 128, 3)
    assert thumb[..., 1].mean() > 240 and thumb[..., 0].mean() < 15  # green, to the edges
    want = Image.open(src).convert("RGB").crop(box).resize((128, 128), Image.BICUBIC)
    again = io.BytesIO()
    want.save(again, format="JPEG", quality=80)
    assert dst.read_bytes() == again.getvalue()


def test_an_unreadable_image_has_no_thumbnail(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert build._thumbnail(str(tmp_path / "bad.jpg"), tmp_path / "t.jpg", (1, 1)) is False
    assert build._thumbnail(str(tmp_path / "gone.jpg"), tmp_path / "t.jpg", (1, 1)) is False
    assert not (tmp_path / "t.jpg").exists()


@pytest.mark.parametrize("info, w, h, box", [
    ({"preprocess": {"crop": [224, 112]}}, 200, 100, (75, 0, 125, 100)),  # tall input
    ({"preprocess": {"crop": [112, 224]}}, 100, 240, (0, 95, 100, 145)),  # wide input
    ({"preprocess": {"crop": [100, 100]}}, 200, 100, (50, 0, 150, 100)),
    ({"preprocess": {}}, 200, 100, (50, 0, 150, 100)),  # no crop recorded: the centre square
    ({}, 200, 100, (50, 0, 150, 100)),  # no preprocessing recorded
])
def test_thumbnails_take_the_crop_of_the_stores_first_model(tmp_path, info, w, h, box, capsys):
    """The input's crop (height, width) from the store's preprocessing gives the region."""
    _stripes(tmp_path / "a.png", w, h, box)
    store = SimpleNamespace(
        manifest={"images": [{"path": str(tmp_path / "gone.png")},
                             {"path": str(tmp_path / "a.png")}]},
        models=["m", "other"],
        model=lambda name: SimpleNamespace(info=info if name == "m" else {"preprocess": {
            "crop": [1, 9]}}))
    (tmp_path / "site" / "thumbs").mkdir(parents=True)
    thumbs = build._thumbnails(tmp_path / "site", store, [0, 1], progress=False)
    assert thumbs == {1: "thumbs/1.jpg"}  # the missing image has none
    thumb = np.asarray(Image.open(tmp_path / "site" / "thumbs" / "1.jpg"), dtype=np.float64)
    assert thumb[..., 1].mean() > 240 and thumb[..., 0].mean() < 15
    want = Image.open(tmp_path / "a.png").convert("RGB").crop(box).resize((128, 128),
                                                                          Image.BICUBIC)
    again = io.BytesIO()
    want.save(again, format="JPEG", quality=80)
    assert (tmp_path / "site" / "thumbs" / "1.jpg").read_bytes() == again.getvalue()
    assert capsys.readouterr().err == ""  # no progress bar when asked for none
    build._thumbnails(tmp_path / "site", store, [0, 1], progress=True)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)thumbnails: ", err) and "2/2" in err and "img/s]" in err


def test_rankings_keep_real_rows_with_positive_scores_in_order():
    top = {"rows.mean": torch.tensor([[4, 0, 7, -1], [2, 3, -1, -1]]),
           "scores.mean": torch.tensor([[0.9, 0.5, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]]),
           "rows.a": torch.tensor([[0, 4, 1, -1], [1, -1, -1, -1]]),
           "scores.a": torch.tensor([[3.0, 1.0, -0.5, 0.0], [0.5, 0.0, 0.0, 0.0]])}
    assert build._rankings(top, ["mean", "a"], 0, 4) == {"mean": [4, 0], "a": [0, 4]}
    assert build._rankings(top, ["mean", "a"], 0, 1) == {"mean": [4], "a": [0]}
    assert build._rankings(top, ["mean"], 1, 4) == {"mean": [2, 3]}


def test_data_files_are_compact_javascript_calls_or_assignments(tmp_path):
    obj = {"a": [1, 2], "b": "x"}
    n = build._js(tmp_path / "c.js", "USAE_CHUNK", obj)
    text = (tmp_path / "c.js").read_text()
    assert text == 'USAE_CHUNK({"a":[1,2],"b":"x"});\n' and n == len(text)
    build._js(tmp_path / "o.js", "USAE_OVERVIEW", obj, assign=True)
    assert (tmp_path / "o.js").read_text() == 'window.USAE_OVERVIEW = {"a":[1,2],"b":"x"};\n'


def test_a_concepts_cam_images_and_checks_are_copied_once_per_model(tmp_path):
    cam = tmp_path / "run" / "cam" / "5"
    cam.mkdir(parents=True)
    for name in ("a.png", "a_alpha.png", "b.png"):
        (cam / name).write_bytes(name.encode())
    doc = {"self_ratio": {"a": 1.5}, "transfer": [[1.0]], "transfer_control": [[0.1]],
           "transfer_offdiag_mean": None, "transfer_control_offdiag_mean": 0.2,
           "control_concept": 9, "trace": [1, 2], "settings": {}}
    site = tmp_path / "site"
    assert build._cam_entry(site, tmp_path / "run" / "cam" / "4", ["a", "b"], 4) == {}
    assert not (site / "cam").exists()
    entry = build._cam_entry(site, cam, ["a", "b", "c"], 5)
    assert entry == {"cam": {"a": "cam/5/a.png", "b": "cam/5/b.png"},
                     "cam_alpha": {"a": "cam/5/a_alpha.png"}}
    assert (site / "cam/5/a.png").read_bytes() == b"a.png"
    assert (site / "cam/5/a_alpha.png").read_bytes() == b"a_alpha.png"
    assert sorted(p.name for p in (site / "cam/5").iterdir()) == ["a.png", "a_alpha.png",
                                                                   "b.png"]
    (cam / "cam.json").write_text(json.dumps(doc))
    entry = build._cam_entry(site, cam, ["a", "b"], 5)  # again, into the same folder
    assert entry["cam_checks"] == {k: doc[k] for k in (
        "self_ratio", "transfer", "transfer_control", "transfer_offdiag_mean",
        "transfer_control_offdiag_mean", "control_concept")}


def _stand_in_eval(monkeypatch, split: str, calls: list) -> None:
    """evaluate, the eval check and the readers replaced by recorders."""
    from usae.analysis.eval_folder import EvalReport

    def evaluate(run, store, out, options, progress):
        calls.append((run.name, store, out.name, options.split, options.top_images,
                      options.plots, options.faithfulness, progress))

    report = EvalReport({"models": ["a"], "split": split, "r2": [[1.0]]})
    monkeypatch.setattr(build, "evaluate", evaluate)
    monkeypatch.setattr(build, "check_eval_of_run", lambda *a, **k: report)
    monkeypatch.setattr(build, "read_concepts", lambda d: [{"concept": "0"}])
    monkeypatch.setattr(build, "load_safetensors", lambda p: {"from": p.parent.name})


def test_the_eval_that_ranks_the_images_is_of_the_explorers_split(tmp_path, monkeypatch,
                                                                   caplog):
    import logging

    from usae.options import ExploreOptions

    calls: list = []
    sae = SimpleNamespace(models=("a",), cfg=SimpleNamespace(n=8))
    _stand_in_eval(monkeypatch, "all", calls)
    # an eval of the same split: its own top images, nothing evaluated
    report, concepts, top = build._eval_inputs(tmp_path / "run", "S", sae, tmp_path / "given",
                                               tmp_path / "site", ExploreOptions(split="all"),
                                               False)
    assert calls == [] and top == {"from": "given"} and report.split == "all"
    assert "top_images_split" not in report
    # an eval of another split: metrics kept, images ranked by an eval of the explorer's split
    with caplog.at_level(logging.INFO, logger="usae.explorer.build"):
        report, _, top = build._eval_inputs(tmp_path / "run", "S", sae, tmp_path / "given",
                                            tmp_path / "site",
                                            ExploreOptions(split="train", top=20), True)
    assert caplog.messages == ["the eval is of split 'all': ranking the top images on split "
                               "'train' into eval-train"]
    assert calls == [("run", "S", "eval-train", "train", 20, False, False, True)]
    assert top == {"from": "eval-train"} and report["top_images_split"] == "train"
    assert report.split == "all"
    # no eval: the run is evaluated into the site, on the explorer's split, 16 images or more
    calls.clear()
    _stand_in_eval(monkeypatch, "val", calls)
    _, _, top = build._eval_inputs(tmp_path / "run", "S", sae, None, tmp_path / "site",
                                   ExploreOptions(split="val", top=5), False)
    assert calls == [("run", "S", "eval", "val", 16, True, True, False)]
    assert top == {"from": "eval"}


def test_a_concept_entrys_maps_are_its_codes_on_one_scale_by_hand():
    """Two models, four tokens, images 10 and 20 shown: the COO codes written by hand become
    uint8 maps scaled by the largest code over both models (0.5 -> 255), row-major per image;
    a concept that nothing shows has empty maps and scale 0."""
    import base64

    models, pos = ["a", "b"], {10: 0, 20: 1, 30: 2}
    # rows: (position in the shown images, token, concept, value), sorted by concept
    a = np.array([[0, 1, 3, 0.25], [1, 3, 3, 0.5], [2, 0, 3, 0.4], [0, 2, 4, 9.0]])
    b = np.array([[1, 0, 3, 0.125]])
    by_concept = {"a": (a, np.searchsorted(a[:, 2], np.arange(7))),  # six concepts
                  "b": (b, np.searchsorted(b[:, 2], np.arange(7)))}
    entry = build._concept_entry(Path("/nowhere"), Path("/no-run"), models, 4,
                                 {"mean": [20, 10], "a": [10], "b": []}, by_concept, pos, 3)
    assert entry["images"] == [10, 20] and entry["scale"] == 0.5
    maps = {m: list(base64.b64decode(v)) for m, v in entry["maps"].items()}
    assert maps == {"a": [0, 128, 0, 0, 0, 0, 0, 255], "b": [0, 0, 0, 0, 64, 0, 0, 0]}
    assert "cam" not in entry and entry["rankings"] == {"mean": [20, 10], "a": [10], "b": []}
    empty = build._concept_entry(Path("/nowhere"), Path("/no-run"), models, 4,
                                 {"mean": [], "a": [], "b": []}, by_concept, pos, 5)
    assert empty["scale"] == 0.0 and empty["maps"] == {"a": "", "b": ""}
    assert empty["images"] == []


def test_codes_of_no_shown_image_are_empty_for_every_concept():
    sae = SimpleNamespace(models=("a", "b"), cfg=SimpleNamespace(n=5))
    by_concept = build._codes_by_concept(sae, None, [])
    for m in ("a", "b"):
        codes, bounds = by_concept[m]
        assert codes.shape == (0, 4) and bounds.tolist() == [0] * 6


def _tiny_run(tmp_path, make_arrays):
    """A store of 12 real small images' activations (arrays) and a run trained on it."""
    from usae.config import resolve
    from usae.data.sources import StoreSource
    from usae.sae.training import train_run
    from usae.store.writer import store_from_arrays

    paths = []
    for i in range(12):
        path = tmp_path / "imgs" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 20 * i, np.uint8)).save(path)
        paths.append(str(path))
    store = store_from_arrays(tmp_path / "store", make_arrays(n_images=12),
                              splits=["train"] * 8 + ["val"] * 4, paths=paths)
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 70, "k": 3,
                                                      "batch_images": 4, "max_steps": 6})
    train_run(cfg, StoreSource(store, "train"), tmp_path / "run", progress=False)
    return tmp_path / "run", tmp_path / "store"


def test_without_an_eval_the_site_keeps_its_own_and_replaces_only_a_site(tmp_path, make_arrays,
                                                                        caplog, capsys):
    """No --eval: the run is evaluated once into the site (its plots shown); the default is
    to refuse a folder that is not a site, and to replace one that is."""
    import logging

    from usae.errors import UsaeError
    from usae.options import ExploreOptions

    run, store = _tiny_run(tmp_path, make_arrays)
    out = tmp_path / "site"
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="usae.explorer.build"):
        index = build.build_explorer(run, store, out, options=ExploreOptions(top=3,
                                                                             split="all"))
    assert re.search(r"(^|\r)thumbnails: ", capsys.readouterr().err)  # bars by default
    assert index == out / "index.html" and index.exists()
    assert f"explorer: 70 concepts -> {out / 'index.html'}" in caplog.messages
    text = (out / "data" / "overview.js").read_text()
    assert text.startswith("window.USAE_OVERVIEW = {") and text.endswith("};\n")
    ov = json.loads(text[text.index("=") + 1:text.rindex(";")])
    assert ov["top"] == 3 and ov["n_concepts"] == 70
    assert (out / "eval" / "report.json").exists()  # the eval it made, kept in the site
    assert ov["plots"] and ov["plots"] == sorted(p.name for p in (out / "eval").glob("*.png"))
    assert all((out / "plots" / p).exists() for p in ov["plots"])
    for name in ("cofires", "fires_m0", "fires_m1"):
        assert all(v is None or type(v) is int for v in ov["table"][name]), name
    for c in (0, 1):
        chunk = (out / "data" / f"concepts_{c}.js").read_text()
        assert chunk.startswith("USAE_CHUNK({") and chunk.endswith("});\n")
        assert type(json.loads(chunk[len("USAE_CHUNK("):-3])["chunk"]) is int
    assert not (out / "data" / "concepts_2.js").exists()
    import shutil

    ev = shutil.copytree(out / "eval", tmp_path / "eval")
    (out / "data" / "marker.txt").write_text("an old site: replaced without --force")
    build.build_explorer(run, store, out, eval_dir=ev, progress=False)
    assert not (out / "data" / "marker.txt").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UsaeError, match="is not empty and is not a usae explorer folder"):
        build.build_explorer(run, store, other, eval_dir=ev, progress=False)
    assert (other / "mine.txt").read_text() == "x"
    build.build_explorer(run, store, other, eval_dir=ev, progress=False, force=True)
    assert (other / "index.html").exists() and not (other / "mine.txt").exists()


def test_without_progress_the_eval_it_runs_draws_no_bar_and_a_given_eval_is_used(
        tmp_path, make_arrays, monkeypatch, capsys):
    run, store = _tiny_run(tmp_path, make_arrays)
    given = []
    real = build.evaluate

    def evaluate(*a, progress):
        given.append(progress)
        return real(*a, progress=progress)

    monkeypatch.setattr(build, "evaluate", evaluate)
    capsys.readouterr()
    build.build_explorer(run, store, tmp_path / "site", progress=False, split="all", top=3)
    assert given == [False] and capsys.readouterr().err == ""
    # given an eval of the explorer's split, the explorer evaluates nothing
    import shutil

    ev = shutil.copytree(tmp_path / "site" / "eval", tmp_path / "eval")
    build.build_explorer(run, store, tmp_path / "site2", ev, progress=False, split="all", top=3)
    assert given == [False] and not (tmp_path / "site2" / "eval").exists()
