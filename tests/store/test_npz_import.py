import subprocess
import sys

import numpy as np
import pytest
import torch

from usae.errors import UsaeError
from usae.store.npz_import import import_npz
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


@pytest.mark.parametrize("combined", [True, False])
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
