import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from usae.data.align import (
    align_tokens,
    common_grid,
    feature_map_to_tokens,
    resample_tokens,
    square_grid,
)
from usae.data.images import list_images, load_rgb
from usae.errors import UsaeError


def _img(path, mode="RGB", size=(20, 16)):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_folder_tree_with_splits_and_labels(tmp_path):
    _img(tmp_path / "train" / "n01" / "a.jpg")
    _img(tmp_path / "train" / "n02" / "b.png")
    _img(tmp_path / "val" / "n01" / "c.jpg")
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    out = list_images(tmp_path)
    assert [(e["label"], e["split"]) for e in out] == [("n01", "train"), ("n02", "train"),
                                                       ("n01", "val")]


def test_no_split_folders_hold_out_a_seeded_tenth(tmp_path):
    for i in range(30):
        _img(tmp_path / "cls" / f"{i:02d}.png")
    a, b = list_images(tmp_path, seed=3), list_images(tmp_path, seed=3)
    assert a == b and sum(e["split"] == "val" for e in a) == 3
    assert [e["path"] for e in a] == sorted(e["path"] for e in a)


def test_list_file(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "list.txt").write_text("# images\nx.png,cat,val\n")
    assert list_images(tmp_path / "list.txt")[0]["label"] == "cat"


def test_empty_and_missing(tmp_path):
    with pytest.raises(UsaeError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(UsaeError, match="does not exist"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    path = tmp_path / f"x.{ext}"
    Image.new(mode, (5, 4)).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (5, 4)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (30, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (10, 30)


def test_corrupt_and_truncated_files(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(UsaeError):
        load_rgb(tmp_path / "bad.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[:200])
    with pytest.raises(UsaeError):
        load_rgb(tmp_path / "trunc.jpg")


def test_square_grid_prefix_rule():
    assert square_grid(197) == (1, (14, 14))
    assert square_grid(257) == (1, (16, 16))
    assert square_grid(261) == (5, (16, 16))
    assert square_grid(196) == (0, (14, 14))


def test_resample_is_identity_on_same_grid_and_differentiable():
    x = torch.randn(2, 256, 5, requires_grad=True)
    y = resample_tokens(x, (16, 16), (14, 14))
    assert y.shape == (2, 196, 5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    z = torch.randn(2, 196, 5)
    assert torch.equal(resample_tokens(z, (14, 14), (14, 14)), z)
    const = torch.ones(1, 256, 3)
    torch.testing.assert_close(resample_tokens(const, (16, 16), (14, 14)), torch.ones(1, 196, 3))


def test_align_tokens_drops_prefix_or_keeps_cls():
    x = torch.randn(2, 1 + 4 + 64, 3)
    assert align_tokens(x, 5, (8, 8), (4, 4)).shape == (2, 16, 3)
    kept = align_tokens(x, 5, (8, 8), (4, 4), keep_cls=True)
    assert kept.shape == (2, 17, 3) and torch.equal(kept[:, 0], x[:, 0])
    with pytest.raises(UsaeError, match="no CLS"):
        align_tokens(torch.randn(1, 4, 3), 0, (2, 2), (2, 2), keep_cls=True)


def test_common_grid():
    assert common_grid({"a": (14, 14), "b": (16, 16)}) == (14, 14)
    with pytest.raises(UsaeError, match="cannot be aligned"):
        common_grid({"a": (14, 14), "b": (7, 14)})


@given(h=st.integers(1, 6), w=st.integers(1, 6), prefix=st.integers(0, 5), d=st.integers(1, 4),
       seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_alignment_keeps_the_row_major_token_layout(h, w, prefix, d, seed):
    """Property: dropping the prefix and resampling to the same grid returns exactly the
    patch tokens, in the feature map's row-major order (a mirrored or transposed token
    index fails); a field constant along rows stays so after resampling."""
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(2, d, h, w, generator=g)
    tokens = feature_map_to_tokens(fmap)
    for t in range(h * w):
        torch.testing.assert_close(tokens[:, t], fmap[:, :, t // w, t % w])
    with_prefix = torch.cat([torch.randn(2, prefix, d, generator=g), tokens], dim=1)
    torch.testing.assert_close(align_tokens(with_prefix, prefix, (h, w), (h, w)), tokens)
    if min(h, w) < 2:
        return  # torch's antialiased bilinear mixes rows when an output side is 1 (torch bug)
    rows = torch.arange(2 * h, dtype=torch.float32).view(1, 1, 2 * h, 1).expand(1, d, 2 * h, 2 * w)
    out = align_tokens(feature_map_to_tokens(rows.contiguous()), 0, (2 * h, 2 * w), (h, w))
    grid = out.reshape(1, h, w, d)
    torch.testing.assert_close(grid, grid[:, :, :1].expand_as(grid))  # constant along a row
    assert bool((grid[0, 1:, 0, 0] > grid[0, :-1, 0, 0]).all())  # rows keep their order


def test_resampling_is_the_papers_antialiased_bilinear_and_keeps_dtype():
    """Killed mutants: antialias off, align_corners on, the dtype dropped (docs/TESTING.md).
    The oracle is torch's interpolate called directly on the (d, h, w) map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16 * 16, 5, generator=g)
    fmap = x.transpose(1, 2).reshape(2, 5, 16, 16)
    want = torch.nn.functional.interpolate(fmap, size=(14, 14), mode="bilinear",
                                           align_corners=False, antialias=True)
    torch.testing.assert_close(resample_tokens(x, (16, 16), (14, 14)),
                               want.reshape(2, 5, 196).transpose(1, 2))
    half = resample_tokens(x.half(), (16, 16), (14, 14))
    assert half.dtype == torch.float16


def test_grid_rules_at_their_boundaries():
    assert square_grid(1) == (0, (1, 1)) and square_grid(3) == (2, (1, 1))
    assert common_grid({"a": (10, 10), "b": (11, 10)}, tolerance=0.1) == (10, 10)  # ratio 1.1
    # the smallest *area* wins (not the first side, not the aspect ratio), ties by (h, w)
    assert common_grid({"a": (15, 16), "b": (14, 14)}) == (14, 14)
    assert common_grid({"a": (15, 14), "b": (14, 15)}, tolerance=0.2) == (14, 15)
    assert common_grid({"a": (15, 16), "b": (16, 14)}, tolerance=0.5) == (16, 14)
    with pytest.raises(UsaeError, match=r"a: 10x10, b: 12x10"):
        common_grid({"a": (10, 10), "b": (12, 10)})
    with pytest.raises(UsaeError, match=r"^--keep-cls: this model has no CLS token$"):
        align_tokens(torch.randn(1, 4, 3), 0, (2, 2), (2, 2), keep_cls=True)


def test_exact_square_grid_names_what_is_not_square():
    """Guards the error of a token count that is not a square grid, with its default label."""
    from usae.data.align import exact_square_grid

    assert exact_square_grid(49) == (7, 7)
    with pytest.raises(UsaeError, match=r"^the layer: 50 tokens are not a square grid"):
        exact_square_grid(50)
    with pytest.raises(UsaeError, match=r"^blocks.3: 50 tokens"):
        exact_square_grid(50, "blocks.3")
