"""usae.data.images beyond the basics of test_images_align.py: every field of a listing, the
list file's rules, the pixel values of high-bit-depth and transparent images, and the crop
box of each resize, each worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import exactly
from usae.data.backbones.base import Preprocess
from usae.data.images import (
    IMAGE_EXTS,
    _to_uint8,
    list_images,
    load_rgb,
    normalize,
    preprocess_image,
    resize_crop,
    resize_crop_u8,
)
from usae.errors import UsaeError


def _save(path, size=(8, 6), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---- listing ----------------------------------------------------------------------------
def test_a_folder_listing_has_resolved_paths_labels_and_splits(tmp_path):
    a = _save(tmp_path / "Validation" / "n01" / "deep" / "a.JPG")
    b = _save(tmp_path / "TEST" / "b.png")
    c = _save(tmp_path / "train" / "n02" / "c.webp")
    (tmp_path / "train" / "n02" / "c.txt").write_text("not an image")
    assert list_images(tmp_path) == [
        {"path": str(b.resolve()), "label": None, "split": "test"},
        {"path": str(a.resolve()), "label": "n01/deep", "split": "val"},
        {"path": str(c.resolve()), "label": "n02", "split": "train"}]


def test_a_folder_without_split_levels_labels_by_the_whole_path(tmp_path):
    _save(tmp_path / "cats" / "young" / "a.png")
    _save(tmp_path / "b.png")
    out = list_images(tmp_path, val_fraction=0.5, seed=1)
    assert [e["label"] for e in out] == [None, "cats/young"]  # sorted paths: b.png first
    assert sorted(e["split"] for e in out) == ["train", "val"]


def test_a_list_file_reads_path_label_and_split_and_skips_comments(tmp_path, monkeypatch):
    _save(tmp_path / "imgs" / "a.png")
    _save(tmp_path / "abs.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text(
        "# a comment\n\n  ../imgs/a.png , cat , validation \n"
        f"{tmp_path / 'abs.png'},,train\n~/abs.png,dog\n")
    out = list_images(tmp_path / "lists" / "l.txt")
    assert out[0] == {"path": str((tmp_path / "imgs" / "a.png").resolve()), "label": "cat",
                      "split": "val"}
    assert out[1] == {"path": str((tmp_path / "abs.png").resolve()), "label": "",
                      "split": "train"}
    assert out[2]["path"] == str((tmp_path / "abs.png").resolve()) and out[2]["label"] == "dog"
    assert out[2]["split"] == "train"  # no split given beside given ones: train


def test_a_list_file_with_only_paths_holds_out_a_seeded_fraction(tmp_path):
    for i in range(10):
        _save(tmp_path / f"{i}.png")
    (tmp_path / "l.txt").write_text("".join(f"{i}.png\n" for i in range(10)))
    out = list_images(tmp_path / "l.txt", val_fraction=0.3, seed=2)
    assert [e["label"] for e in out] == [None] * 10
    held = [i for i, e in enumerate(out) if e["split"] == "val"]
    assert held == sorted(np.random.default_rng([2, 104729]).permutation(10)[:3].tolist())


def test_an_unknown_split_in_a_list_file_is_refused(tmp_path):
    (tmp_path / "l.txt").write_text("a.png,cat,holdout\n")
    with exactly(f"{tmp_path / 'l.txt'}: unknown split 'holdout' in line 'a.png,cat,holdout' — "
                "use one of ['test', 'train', 'val', 'validation']"):
        list_images(tmp_path / "l.txt")


def test_nothing_to_list_names_the_extensions(tmp_path):
    (tmp_path / "notes.txt").mkdir()
    with exactly(f"no images under {tmp_path} (looked for {', '.join(sorted(IMAGE_EXTS))})"):
        list_images(tmp_path)
    with exactly(f"{tmp_path / 'nope'} does not exist"):
        list_images(tmp_path / "nope")


# ---- decoding ---------------------------------------------------------------------------
def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(load_rgb(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]
    assert got[1, 0].tolist() == [127, 127, 127]


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    la = np.array([[[0, 255], [0, 0], [100, 128]]], np.uint8)  # opaque black, clear, half grey
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = np.asarray(load_rgb(tmp_path / "la.png"))[0]
    assert got.tolist() == [[0, 0, 0], [255, 255, 255], [177, 177, 177]]


def test_the_default_split_seed_is_0(tmp_path):
    for i in range(20):
        _save(tmp_path / f"{i:02d}.png")
    assert list_images(tmp_path) == list_images(tmp_path, seed=0)
    assert list_images(tmp_path) != list_images(tmp_path, seed=1)


def test_a_palette_with_a_transparent_index_is_composited(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255],
                                                                  [255, 0, 0]]]


@pytest.mark.parametrize("mode, pixels, key", [
    ("RGB", [[[10, 20, 30], [1, 2, 3]]], (10, 20, 30)),
    ("L", [[5, 9]], 5),
])
def test_a_colour_key_is_transparency_too(tmp_path, mode, pixels, key):
    """A PNG's tRNS colour key on an RGB or grey image: those pixels are composited on white
    like any transparent pixel (they kept the key's colour before)."""
    Image.fromarray(np.array(pixels, np.uint8), mode).save(tmp_path / "k.png", transparency=key)
    with Image.open(tmp_path / "k.png") as im:
        assert im.mode == mode and im.info["transparency"] == key
    second = [1, 2, 3] if mode == "RGB" else [9, 9, 9]
    assert np.asarray(load_rgb(tmp_path / "k.png")).tolist() == [[[255, 255, 255], second]]


def test_a_palette_image_with_alpha_is_composited_on_white(tmp_path, monkeypatch):
    """Mode PA (palette plus alpha), which no file Pillow writes opens as: handed to the loader
    by a stand-in for Image.open."""
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 200, 10, 10] * 128)
    pa.putpixel((0, 0), (1, 0))  # colour 1, clear
    pa.putpixel((1, 0), (1, 255))  # colour 1, opaque
    monkeypatch.setattr(Image, "open", lambda path: pa)
    assert np.asarray(load_rgb(tmp_path / "any.png")).tolist() == [[[255, 255, 255],
                                                                    [200, 10, 10]]]


def test_sixteen_bit_images_keep_their_content(tmp_path):
    arr = np.array([[0, 257, 65535, 32896]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    assert np.asarray(load_rgb(tmp_path / "g.png"))[0, :, 0].tolist() == [0, 1, 255, 128]


@pytest.mark.parametrize("mode, values, want", [
    ("I;16", [0, 514, 65535], [0, 2, 255]),
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # floats in [0, 1]: times 255
    ("F", [0.0, 10.0, 255.0], [0, 10, 255]),  # already 8-bit values
    ("I", [0, 100, 255], [0, 100, 255]),
    ("I", [0, 2570, 65535], [0, 10, 255]),  # 16-bit data as 32-bit integers
    ("I", [-10, 0, 10], [0, 128, 255]),  # anything else: its range
    ("F", [-1.0, 1.0, 3.0], [0, 128, 255]),
    ("I", [70000, 70000, 70000], [0, 0, 0]),  # a flat image out of range: black
    ("F", [2.0, 300.0, 2.0], [0, 255, 0]),
    ("I;16", [257, 514, 65535], [1, 2, 255]),  # always by 257, whatever the range
    ("I;16B", [257, 514, 65535], [1, 2, 255]),
    ("F", [0.0, 1.5, 2.0], [0, 2, 2]),  # beyond 1: 8-bit values
    ("F", [0.0, 0.99, 1.0], [0, 252, 255]),  # times 255, not 256
    ("I", [0, 100, 256], [0, 0, 1]),  # beyond 255: 16-bit data
    ("I", [0, 2570, 60000], [0, 10, 233]),
    ("I", [257, 2570, 65535], [1, 10, 255]),
    ("I", [1000, 65536], [0, 255]),  # beyond 16 bits: its range
    ("I", [-10, 0, 5], [0, 170, 255]),
])
def test_high_bit_depth_values_map_to_eight_bits(mode, values, want):
    out = _to_uint8(np.array(values, np.float64), mode)
    assert out.tolist() == want and out.dtype == np.uint8


def test_non_finite_pixels_are_refused():
    with exactly("mode F image has NaN or infinite pixels"):
        _to_uint8(np.array([0.0, np.nan]), "F")
    with exactly("mode F image has NaN or infinite pixels"):
        _to_uint8(np.array([0.0, np.inf]), "F")


def test_a_float_image_file_is_read_through_its_range(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32), "F").save(tmp_path / "f.tiff")
    assert np.asarray(load_rgb(tmp_path / "f.tiff"))[0, :, 1].tolist() == [0, 64, 255]


def test_an_unreadable_file_says_why(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(UsaeError, match=r"^UnidentifiedImageError: cannot identify image "):
        load_rgb(tmp_path / "x.png")
    with pytest.raises(UsaeError, match=r"^FileNotFoundError: "):
        load_rgb(tmp_path / "none.png")


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _save(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UsaeError, match=r"^decompression bomb: "):
        load_rgb(tmp_path / "big.png")


# ---- resizing and normalization ---------------------------------------------------------
def _stripes(w, h):
    """An image whose every pixel says where it is: R = x, G = y."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(a)


def test_resize_crop_takes_the_center_after_scaling_the_short_side():
    p = Preprocess(crop=(4, 4), resize=4, interpolation="nearest")
    out = resize_crop_u8(_stripes(16, 8), p)  # scale 0.5: 8 x 4, then the middle 4 columns
    assert out.shape == (3, 4, 4) and out.dtype == torch.uint8
    # nearest samples each new pixel's centre: old x = 2 i + 1; columns 2-5 of the 8 are kept
    assert out[0, 0].tolist() == [5, 7, 9, 11] and out[1, :, 0].tolist() == [1, 3, 5, 7]


def test_a_crop_larger_than_the_resize_wins():
    p = Preprocess(crop=(6, 6), resize=4, interpolation="nearest")
    out = resize_crop_u8(_stripes(12, 6), p)  # max(4/6, 6/6, 6/12) = 1: no scaling
    assert out.shape == (3, 6, 6) and out[0, 0].tolist() == [3, 4, 5, 6, 7, 8]


def test_an_odd_margin_is_cut_by_floor_division():
    p = Preprocess(crop=(3, 3), resize=3, interpolation="nearest")
    out = resize_crop_u8(_stripes(16, 8), p)  # scale 3/8: 6 x 3; the 3 left over: 1 and 2
    assert out[0, 0].tolist() == [4, 6, 9]


def test_a_non_square_crop_fits_both_sides():
    p = Preprocess(crop=(2, 6), resize=2, interpolation="nearest")
    out = resize_crop_u8(_stripes(6, 6), p)  # width needs scale 1: 6 x 6, crop rows 2-3
    assert out.shape == (3, 2, 6) and out[1, :, 0].tolist() == [2, 3]


@pytest.mark.parametrize("name, want", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR),
                                        ("nearest", Image.NEAREST), ("lanczos", Image.LANCZOS),
                                        ("unknown", Image.BICUBIC)])
def test_each_interpolation_is_pils_filter_of_that_name(name, want):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 13, 3), np.uint8))
    p = Preprocess(crop=(5, 5), resize=6, interpolation=name)
    scale = 6 / 9
    size = (max(5, round(13 * scale)), max(5, round(9 * scale)))
    ref = np.asarray(img.resize(size, want))
    left, top = (size[0] - 5) // 2, (size[1] - 5) // 2
    want_px = torch.from_numpy(ref[top:top + 5, left:left + 5].copy()).permute(2, 0, 1)
    assert torch.equal(resize_crop_u8(img, p), want_px)


def test_resize_crop_is_in_zero_one_and_normalize_uses_the_models_statistics():
    p = Preprocess(crop=(2, 2), resize=2, interpolation="nearest", mean=(0.5, 0.25, 0.0),
                   std=(0.5, 0.25, 2.0))
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    x = resize_crop(img, p)
    assert x.dtype == torch.float32 and x[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert normalize(x, p)[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 0.1])
    assert torch.equal(preprocess_image(img, p), normalize(x, p))
