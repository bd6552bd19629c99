import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import exactly
from usae.errors import UsaeError
from usae.store import npz_import
from usae.store.npz_import import find_npz, import_npz
from usae.store.store import Store


def write_reference_cache(root, n=10, combined=True):
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(n):
        arrays = {"dinov2": rng.normal(size=(257, 6)).astype(np.float32),  # CLS + 16x16
                  "siglip": rng.normal(size=(196, 8)).astype(np.float32),  # 14x14, no prefix
                  "vit": rng.normal(size=(197, 4)).astype(np.float32)}  # CLS + 14x14
        truth[f"n0{i % 2}/img{i}"] = arrays
        folder = root / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if combined:
            np.savez(folder / f"img{i}_combined.npz", **arrays)
        else:
            for name, a in arrays.items():
                np.savez_compressed(folder / f"img{i}_{name}.npz", activation=a)
    return truth


@pytest.mark.parametrize("combined", [False])  # (both layouts in process: below)
def test_import_drops_prefix_and_resamples(tmp_path, combined):
    truth = write_reference_cache(tmp_path / "npz", combined=combined)
    subprocess.run([sys.executable, "-m", "usae.cli", "store", "import-npz",
                    str(tmp_path / "npz"), "--out", str(tmp_path / "store"),
                    "--models", "dinov2,siglip,vit", "--dtype", "float32", "--split", "train"],
                   check=True, capture_output=True)
    store = Store(tmp_path / "store")
    info = store.info()
    assert info["models"] == {"dinov2": {"d": 6, "tokens": 196}, "siglip": {"d": 8, "tokens": 196},
                              "vit": {"d": 4, "tokens": 196}}
    assert info["splits"] == {"train": 10}
    keys = [img["path"] for img in store.manifest["images"]]
    row = keys.index("n01/img3")
    got = store.read("dinov2", np.array([row]))[0]
    # written out: tokens (256, d) -> map (d, 16, 16) -> antialiased bilinear 14x14 -> (196, d)
    fmap = torch.from_numpy(truth["n01/img3"]["dinov2"][1:]).T.reshape(1, 6, 16, 16)
    expected = torch.nn.functional.interpolate(fmap, size=(14, 14), mode="bilinear",
                                               align_corners=False, antialias=True)
    expected = expected.reshape(6, 196).T
    torch.testing.assert_close(got, expected)
    np.testing.assert_array_equal(store.read("vit", np.array([row]))[0].numpy(),
                                  truth["n01/img3"]["vit"][1:])


def test_missing_models_and_inconsistent_shapes(tmp_path):
    write_reference_cache(tmp_path / "npz", n=3, combined=False)
    (tmp_path / "npz" / "n00" / "img0_vit.npz").unlink()
    with pytest.raises(UsaeError, match="lack some models.*img0.*vit"):
        import_npz(tmp_path / "npz", tmp_path / "s", ["dinov2", "siglip", "vit"])
    np.savez(tmp_path / "npz" / "n00" / "img0_vit.npz", activation=np.zeros((50, 4)))
    with pytest.raises(UsaeError, match="vit.*shape"):
        import_npz(tmp_path / "npz", tmp_path / "s2", ["dinov2", "siglip", "vit"],
                   progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UsaeError, match="no <image>_combined.npz"):
        import_npz(tmp_path / "nothing", tmp_path / "s3", ["vit"])


def test_missing_array_in_combined(tmp_path):
    write_reference_cache(tmp_path / "npz", n=2)
    with pytest.raises(UsaeError, match="no array 'clip'"):
        import_npz(tmp_path / "npz", tmp_path / "s", ["dinov2", "clip"], progress=False)


# ---- in process: the manifest, the arrays and the failures, read back from the store ------

MODELS = ["dinov2", "siglip", "vit"]




def _on_14x14(tokens_td: np.ndarray, prefix: int) -> np.ndarray:
    """The oracle: drop the prefix, then bilinear antialiased onto 14x14 when it is not."""
    grid = tokens_td[prefix:]
    side = int(round(len(grid) ** 0.5))
    if side == 14:
        return grid
    fmap = torch.from_numpy(grid).T.reshape(1, -1, side, side)
    out = F.interpolate(fmap, size=(14, 14), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.reshape(grid.shape[1], 196).T.numpy()


@pytest.mark.parametrize("combined", [True, False])
def test_in_process_import_writes_every_image_and_its_manifest(tmp_path, combined):
    truth = write_reference_cache(tmp_path / "npz", n=5, combined=combined)
    info = import_npz(str(tmp_path / "npz"), str(tmp_path / "store"), MODELS, split="val",
                      dtype="float32", batch=2, progress=False)
    store = Store(tmp_path / "store")
    manifest = store.manifest
    assert [img["path"] for img in manifest["images"]] == sorted(truth)
    assert all(img["label"] is None and img["split"] == "val" for img in manifest["images"])
    assert manifest["source"] == str((tmp_path / "npz").resolve())
    prefixes = {"dinov2": 1, "siglip": 0, "vit": 1}
    grids = {"dinov2": [16, 16], "siglip": [14, 14], "vit": [14, 14]}
    for m, d in (("dinov2", 6), ("siglip", 8), ("vit", 4)):
        assert manifest["models"][m] == {
            "d": d, "tokens": 196, "spec": f"npz:{m}", "grid": grids[m],
            "aligned_grid": [14, 14], "prefix_tokens": prefixes[m], "layer": "unknown",
            "source": "reference npz"}
        for row, key in enumerate(sorted(truth)):
            np.testing.assert_array_equal(store.read(m, np.array([row]))[0].numpy(),
                                          _on_14x14(truth[key][m], prefixes[m]))  # float32
    assert info == json.loads((tmp_path / "store" / "manifest.json").read_text())


def test_the_default_store_is_float16_with_a_seeded_validation_split(tmp_path):
    truth = write_reference_cache(tmp_path / "npz", n=10)
    import_npz(tmp_path / "npz", tmp_path / "a", MODELS, progress=False)
    import_npz(tmp_path / "npz", tmp_path / "b", MODELS, seed=5, progress=False)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert a.dtype == "float16"
    splits_a = [img["split"] for img in a.manifest["images"]]
    splits_b = [img["split"] for img in b.manifest["images"]]
    assert splits_a.count("val") == 1 and splits_b.count("val") == 1  # 10 % of 10
    rng_val = np.random.default_rng([0, 104729]).permutation(10)[:1].tolist()
    assert splits_a.index("val") == rng_val[0]
    assert splits_b.index("val") == np.random.default_rng([5, 104729]).permutation(10)[0]
    key = sorted(truth)[3]
    np.testing.assert_allclose(a.read("vit", np.array([3]))[0].float().numpy(),
                               truth[key]["vit"][1:], atol=2e-3, rtol=2e-3)


def test_a_killed_import_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    write_reference_cache(tmp_path / "npz", n=7)
    import_npz(tmp_path / "npz", tmp_path / "whole", MODELS, dtype="float32", batch=2,
               progress=False)
    real = npz_import.StoreWriter.commit
    calls = []

    def commit_then_die(self, start, acts, extra):
        real(self, start, acts, extra)
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(npz_import.StoreWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        import_npz(tmp_path / "npz", tmp_path / "resumed", MODELS, dtype="float32", batch=2,
                   progress=False)
    assert calls == [0, 2]
    monkeypatch.setattr(npz_import.StoreWriter, "commit", lambda self, start, acts, extra: (
        calls.append(start), real(self, start, acts, extra)))
    import_npz(tmp_path / "npz", tmp_path / "resumed", MODELS, dtype="float32", batch=2,
               progress=False)
    assert calls == [0, 2, 4, 6]  # the two committed chunks are not read again
    whole, resumed = Store(tmp_path / "whole"), Store(tmp_path / "resumed")
    for m in MODELS:
        rows = np.arange(7)
        assert torch.equal(whole.read(m, rows), resumed.read(m, rows))


def test_find_npz_maps_each_file_to_its_image_and_model(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    for name in ("x_clip_vit", "x_vit", "a/b/y_combined", "a/z_vit", "a/notes", "w_dino"):
        np.savez(src / f"{name}.npz", activation=np.zeros((4, 2)))
    (src / "readme_vit.txt").write_text("not an npz")
    found = find_npz(src, ["vit", "clip_vit"])
    assert found == {
        "x": {"clip_vit": (src / "x_clip_vit.npz", "activation"),
              "vit": (src / "x_vit.npz", "activation")},
        "a/b/y": {"vit": (src / "a/b/y_combined.npz", "vit"),
                  "clip_vit": (src / "a/b/y_combined.npz", "clip_vit")},
        "a/z": {"vit": (src / "a/z_vit.npz", "activation")},
    }
    with exactly(f"{src / 'x_vit.npz'} is not a folder"):
        find_npz(src / "x_vit.npz", ["vit"])
    (src / "a" / "b" / "y_combined.npz").unlink()  # (a combined file holds every model)
    with exactly(f"no <image>_combined.npz or <image>_<NAME>.npz files under {src / 'a'}"):
        find_npz(src / "a", ["siglip"])


def test_images_that_lack_models_are_counted_and_the_first_five_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        np.savez(src / f"img{i}_vit.npz", activation=np.zeros((4, 2)))
    np.savez(src / "img0_dino.npz", activation=np.zeros((4, 2)))
    with exactly("6 image(s) lack some models (img1: missing ['dino']; img2: missing ['dino']; "
                "img3: missing ['dino']; img4: missing ['dino']; img5: missing ['dino'])"):
        import_npz(src, tmp_path / "s", ["vit", "dino"], progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 5, 3)), None),  # a batch of one: squeezed to (tokens, d)
    (np.zeros((2, 5, 3)), "array has shape (2, 5, 3), expected (tokens, d)"),
    (np.zeros(5), "array has shape (5,), expected (tokens, d)"),
])
def test_an_array_must_be_tokens_by_d(tmp_path, array, message):
    path = tmp_path / "i_vit.npz"
    np.savez(path, activation=array)
    if message is None:
        assert npz_import._load(path, "activation", "vit").shape == (5, 3)
    else:
        with exactly(f"{path}: model 'vit' {message}"):
            npz_import._load(path, "activation", "vit")


def test_a_damaged_or_pickled_file_cannot_be_read(tmp_path):
    bad = tmp_path / "i_vit.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsaeError, match=rf"^{re.escape(str(bad))}: cannot read \("):
        npz_import._load(bad, "activation", "vit")
    pickled = tmp_path / "p_vit.npz"
    np.savez(pickled, activation=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UsaeError, match=rf"^{re.escape(str(pickled))}: cannot read \(.*pickle"):
        npz_import._load(pickled, "activation", "vit")
    np.savez(tmp_path / "c_combined.npz", vit=np.zeros((4, 2)))
    with exactly(f"{tmp_path / 'c_combined.npz'}: no array 'clip' for model 'clip' (it has "
                "['vit'])"):
        npz_import._load(tmp_path / "c_combined.npz", "clip", "clip")


@pytest.mark.parametrize("bad", ["a", "b"])
def test_a_bad_array_in_any_image_names_its_model(tmp_path, bad):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        np.savez(src / f"{name}_vit.npz", activation=np.zeros((5, 3), np.float32))
        np.savez(src / f"{name}_dino.npz", activation=np.zeros(7 if name == bad else (5, 3),
                                                                np.float32))
    with exactly(f"{src / (bad + '_dino.npz')}: model 'dino' array has shape (7,), expected "
                "(tokens, d)"):
        import_npz(src, tmp_path / "s", ["vit", "dino"], progress=False)


def test_an_image_shaped_unlike_the_first_is_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "a_vit.npz", activation=np.zeros((5, 3), np.float32))
    np.savez(src / "b_vit.npz", activation=np.zeros((5, 4), np.float32))
    with exactly(f"{src / 'b_vit.npz'}: model 'vit' has shape (5, 4) but the first image has "
                "(5, 3)"):
        import_npz(src, tmp_path / "s", ["vit"], progress=False)


def test_the_progress_bar_counts_images_from_where_a_resume_starts(tmp_path, progress_bars):
    write_reference_cache(tmp_path / "npz", n=3)
    bars = progress_bars(npz_import)
    import_npz(tmp_path / "npz", tmp_path / "s", MODELS, batch=2)
    assert bars[0].kw == {"total": 3, "initial": 0, "desc": "import-npz", "unit": "img",
                          "disable": False}
    assert bars[0].updates == [2, 1] and bars[0].closed
    import_npz(tmp_path / "npz", tmp_path / "s2", MODELS, progress=False)
    assert bars[1].kw["disable"] is True
