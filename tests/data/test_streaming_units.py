"""``StreamSource`` and ``train_from_images`` in process, on backbones whose activations are
known by arithmetic.

Every image is one flat colour, so after resizing every pixel is that colour. The backbones
here average each patch's normalized colour and map it through a fixed linear layer: every
token of image i is ``W @ ((colour_i / 255 - 0.5) / 0.5)``, and a row of a batch names the
image it came from. (tests/data/test_stream.py trains on real EfficientNets end to end.)"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tests.conftest import exactly
from tests.test_dist_collectives import world  # noqa: F401 - the fixture
from usae.data import streaming
from usae.data.backbones.base import HALF, Backbone, Preprocess
from usae.data.images import list_images
from usae.data.sources import chunked_order, epoch_permutation
from usae.data.streaming import CHUNK_IMAGES, StreamSource, train_from_images
from usae.distributed import Dist
from usae.options import StreamOptions

N_IMAGES = 40


def colour(i: int) -> tuple[int, int, int]:
    return (7 * i) % 256, (31 * i + 5) % 256, (97 * i + 11) % 256


class PatchColour(Backbone):
    """Tokens: each patch's mean colour through ``module`` (3 -> d); with a prefix token, the
    whole image's mean colour first."""

    def _features(self, pixels_bchw: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels_bchw, pixels_bchw.shape[-1] // self.grid[1])
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, h*w, 3)
        if self.n_prefix:
            tokens = torch.cat([pixels_bchw.mean((2, 3))[:, None], tokens], dim=1)
        return self.module(tokens)


def patch_colour(name: str, d: int, n_prefix: int = 0) -> PatchColour:
    torch.manual_seed(len(name) + d)
    return PatchColour(name=name, spec=f"test:{name}", module=nn.Linear(3, d, bias=False),
                       d=d, n_prefix=n_prefix, grid=(2, 2), layer="linear",
                       preprocess=Preprocess(crop=(8, 8), resize=8, interpolation="nearest",
                                             mean=HALF[0], std=HALF[1]))


def token(b: PatchColour, i: int) -> torch.Tensor:
    """The oracle: (d,), every token of image i through backbone b."""
    rgb = (torch.tensor(colour(i), dtype=torch.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        return b.module(rgb)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    for i in range(N_IMAGES):
        Image.new("RGB", (8, 8), colour(i)).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture
def backbones():
    return [patch_colour("a", 5), patch_colour("bb", 3)]


def entries(folder, n=N_IMAGES):
    return [{"path": str(folder / f"img{i:03d}.png"), "split": "train"} for i in range(n)]


def source(backbones, folder, **kw) -> StreamSource:
    return StreamSource(backbones, (2, 2), entries(folder), progress=False, **kw)


def rows_of(b: PatchColour, images, tokens: int = 4) -> torch.Tensor:
    """(len(images)·tokens, d): the rows a batch of these images must hold."""
    return torch.stack([token(b, int(i)) for i in images]).repeat_interleave(tokens, dim=0)


def test_the_oracle_holds_for_one_image(backbones, folder):
    src = source(backbones, folder)
    batch = next(src.batches(1, seed=0, epoch=0))
    first = src.image_order(0, 0)[0]
    for b in backbones:
        torch.testing.assert_close(batch[b.name], rows_of(b, [first]), rtol=0, atol=1e-6)


def test_the_source_describes_its_images_and_models(backbones, folder):
    src = source(backbones, folder)
    assert (src.n_images(), src.models, src.dims) == (N_IMAGES, ("a", "bb"), (5, 3))
    assert src.tokens_per_image() == 4
    assert StreamSource(backbones, (2, 3), entries(folder), keep_cls=True).tokens_per_image() \
        == 7
    assert src.dist == Dist() and src.workers == 0
    with exactly("no images to stream"):
        StreamSource(backbones, (2, 2), [])


@pytest.mark.parametrize("buffer_images, chunks", [(1, 1), (63, 1), (64, 1), (200, 3)])
def test_the_image_order_is_the_stores_chunked_order(backbones, buffer_images, chunks):
    many = [{"path": f"never/read/{i}.png"} for i in range(700)]
    src = StreamSource(backbones, (2, 2), many, buffer_images=buffer_images)
    assert src.buffer_chunks == chunks
    for seed, epoch in ((0, 0), (3, 2)):
        np.testing.assert_array_equal(src.image_order(seed, epoch),
                                      chunked_order(700, CHUNK_IMAGES, chunks, seed, epoch))
    assert CHUNK_IMAGES == 64


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_holds_its_planned_images_from_start_on(backbones, folder, workers):
    src = source(backbones, folder, workers=workers)
    order = src.image_order(1, 2)
    got = list(src.batches(6, seed=1, epoch=2, start=2))
    assert len(got) == N_IMAGES // 6 - 2  # the last, partial batch is dropped
    for n, batch in enumerate(got):
        images = order[(n + 2) * 6:(n + 3) * 6]
        assert set(batch) == {"a", "bb"}
        for b in backbones:
            assert batch[b.name].dtype == torch.float32
            torch.testing.assert_close(batch[b.name], rows_of(b, images), rtol=0, atol=1e-6)


def test_a_rank_reads_its_part_of_every_batch(backbones, folder):
    src = source(backbones, folder)
    order = src.image_order(4, 0)
    for rank in range(3):
        got = list(src.batches(6, seed=4, epoch=0, shard=(rank, 3)))
        assert len(got) == N_IMAGES // 6
        for n, batch in enumerate(got):
            images = order[n * 6 + 2 * rank:n * 6 + 2 * rank + 2]
            torch.testing.assert_close(batch["a"], rows_of(backbones[0], images), rtol=0,
                                       atol=1e-6)


def test_nothing_is_extracted_past_the_end(backbones, folder):
    src = source(backbones, folder)
    assert list(src.batches(6, seed=0, epoch=0, start=N_IMAGES // 6)) == []
    assert list(src.batches(N_IMAGES + 1, seed=0, epoch=0)) == []


def test_keep_cls_puts_the_prefix_token_first(folder):
    cls_model = patch_colour("c", 4, n_prefix=1)
    src = StreamSource([cls_model], (2, 2), entries(folder), keep_cls=True, progress=False)
    batch = next(src.batches(2, seed=0, epoch=0))["c"]
    order = src.image_order(0, 0)
    torch.testing.assert_close(batch, rows_of(cls_model, order[:2], tokens=5), rtol=0,
                               atol=1e-6)


def test_shuffled_pairing_needs_a_store(backbones, folder):
    with exactly("shuffle_pairing needs a store (usae cache, then train --store)"):
        next(source(backbones, folder).batches(4, 0, 0, shuffle_pairing=True))


def test_a_bad_image_stops_the_stream_with_its_path(backbones, folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    listed = entries(folder, 3) + [{"path": str(bad), "split": "train"}]
    src = StreamSource(backbones, (2, 2), listed, progress=False)
    with pytest.raises(Exception) as info:
        list(src.batches(4, seed=0, epoch=0))
    message = str(info.value)
    assert message.startswith(f"cannot stream {bad}: ")
    assert message.endswith(" — remove it (or cache the images with `usae cache`, which "
                            "skips bad files), then --resume")


def stats_oracle(b: PatchColour, images) -> tuple[np.ndarray, np.ndarray, float, float]:
    """mean_d, std_d (population) and the scalar mean and std over these images' tokens."""
    x = rows_of(b, images).double().numpy()
    return x.mean(0), x.std(0), float(x.mean()), float(x.std())


def check_stats(stats, backbones, images) -> None:
    for b in backbones:
        mean_d, std_d, mean, std = stats_oracle(b, images)
        np.testing.assert_allclose(stats[b.name].mean_d, mean_d, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[b.name].std_d, std_d, rtol=1e-4, atol=1e-6)
        assert stats[b.name].mean == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert stats[b.name].std == pytest.approx(std, rel=1e-4)


@pytest.mark.parametrize("stats_images", [7, 35, 1000])  # a sample; two batches of 32; all
def test_statistics_cover_a_seeded_sample_of_the_images(backbones, folder, stats_images,
                                                        progress_bars, caplog):
    bars = progress_bars(streaming)
    src = StreamSource(backbones, (2, 2), entries(folder), stats_images=stats_images)
    with caplog.at_level(logging.INFO, logger="usae.data.streaming"):
        stats = src.stats()
    n = min(stats_images, N_IMAGES)
    sample = epoch_permutation(N_IMAGES, 0, 0, salt=3)[:n]
    check_stats(stats, backbones, sample)
    assert src.stats() is stats  # computed once
    assert caplog.messages == [
        f"standardization statistics: {n} images through the backbones first"]
    [bar] = bars
    assert bar.kw == {"total": n, "desc": "statistics", "unit": "img", "disable": False}
    assert bar.updates == [min(32, n - i) for i in range(0, n, 32)] and bar.closed


def test_statistics_come_from_stats_from_when_given(backbones, folder):
    listed = [str(folder / f"img{i:03d}.png") for i in range(N_IMAGES)]
    src = StreamSource(backbones, (2, 2), entries(folder, 5), stats_images=30,
                       stats_from=listed[10:], progress=False)
    sample = epoch_permutation(30, 0, 0, salt=3) + 10
    check_stats(src.stats(), backbones, sample)


def test_statistics_on_two_ranks_equal_one_process(backbones, folder, world,  # noqa: F811
                                                   progress_bars):
    bars = progress_bars(streaming)
    w = world(2)

    def on_rank(rank):
        return StreamSource(backbones, (2, 2), entries(folder), stats_images=37,
                            dist=Dist(rank, 2)).stats()

    both = w.run(on_rank)
    sample = epoch_permutation(N_IMAGES, 0, 0, salt=3)[:37]
    for stats in both:
        check_stats(stats, backbones, sample)
    assert sorted(b.kw["total"] for b in bars) == [18, 19]  # each rank its share
    assert sorted(b.kw["disable"] for b in bars) == [False, True]  # a bar on rank 0 only
    assert sorted(sum(b.updates) for b in bars) == [18, 19]


def test_no_bar_without_progress(backbones, folder, progress_bars):
    bars = progress_bars(streaming)
    StreamSource(backbones, (2, 2), entries(folder), stats_images=3, progress=False).stats()
    assert bars[0].kw["disable"] is True


# ---- train_from_images: each argument followed to the library -----------------------------

class Recorded:
    """What ``train_from_images`` handed to ``Dist.from_env``, ``build_backbones``,
    ``resolve_run_config`` and ``train_run`` (and whether the Dist was closed)."""

    def __init__(self, monkeypatch, backbones, fail: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.closed = 0
        self.built: list[tuple] = []
        self.moved: list[tuple] = []
        self.devices: list = []
        self.resolved: list = []
        outer = self

        class RecordingDist(Dist):
            def close(self) -> None:
                outer.closed += 1

        def build(specs, pretrained=None, align="resample"):
            self.built.append(([s.text for s in specs], pretrained, align))
            for b in backbones:
                b.to = lambda device, b=b: self.moved.append((b.name, device)) or b
            return backbones, (2, 2)

        def train_run(cfg, source, out, **kw):
            if fail:
                raise fail
            self.calls.append({"cfg": cfg, "source": source, "out": out, **kw})
            return {"steps": 0}

        monkeypatch.setattr(streaming, "build_backbones", build)
        monkeypatch.setattr(streaming, "train_run", train_run)
        real_resolve = streaming.resolve_run_config

        def resolve(*args):
            self.resolved.append(args)
            return real_resolve(*args)

        monkeypatch.setattr(streaming, "resolve_run_config", resolve)
        monkeypatch.setattr(streaming.Dist, "from_env", classmethod(
            lambda cls, device: self.devices.append(device) or RecordingDist()))


def test_train_from_images_hands_the_library_its_sources_and_record(monkeypatch, backbones,
                                                                    folder, tmp_path):
    rec = Recorded(monkeypatch, backbones)
    summary = train_from_images(folder, "timm:never_built?name=a,effnet:lite0?name=bb",
                                tmp_path / "run", workers=3, shuffle_buffer=200, stats_images=11,
                                val_fraction=0.25, split_seed=2, align="resize_input",
                                pretrained=False, progress=False,
                                sets=["eval_every=5", "n_concepts=16", "k=2"], max_steps=7,
                                force=True)
    assert summary == {"steps": 0}
    assert rec.built == [(["timm:never_built?name=a", "effnet:lite0?name=bb"], False,
                          "resize_input")]
    assert rec.moved == [("a", "cpu"), ("bb", "cpu")] and rec.closed == 1
    [call] = rec.calls
    cfg, src, val = call["cfg"], call["source"], call["val_source"]
    assert (cfg.sae.models, cfg.sae.dims, cfg.sae.n_concepts, cfg.train.max_steps) == \
        (("a", "bb"), (5, 3), 16, 7)
    assert (call["out"], call["resume"], call["force"], call["progress"]) == \
        (tmp_path / "run", False, True, False)
    assert isinstance(call["dist"], Dist)
    listed = list_images(folder, val_fraction=0.25, seed=2)
    train = [e["path"] for e in listed if e["split"] == "train"]
    held = [e["path"] for e in listed if e["split"] == "val"]
    assert src.paths == train and val.paths == held and 0 < len(held) < N_IMAGES
    for s in (src, val):
        assert (s.workers, s.keep_cls, s.buffer_chunks, s.stats_images, s.progress) == \
            (3, False, 3, 11, False)
        assert s.stats_paths == [e["path"] for e in listed] and s.dist is call["dist"]
        assert s.backbones == backbones and s.target == (2, 2)
    assert call["extra"] == {"split": "train", "stream": {
        "source": folder.name, "images": len(train), "stats_images": 11,
        "models": {b.name: {**b.info(), "aligned_grid": [2, 2]} for b in backbones}}}


def test_the_stream_records_at_most_every_image_for_statistics(monkeypatch, backbones, folder,
                                                               tmp_path):
    rec = Recorded(monkeypatch, backbones)
    train_from_images(folder, "effnet:lite0?name=a", tmp_path / "run", progress=False, max_steps=1,
                      sets=["n_concepts=16", "k=2"])
    call = rec.calls[0]
    assert call["extra"]["stream"]["stats_images"] == N_IMAGES
    assert call["source"].stats_images == StreamOptions.stats_images
    assert call["source"].buffer_chunks == StreamOptions.shuffle_buffer // 64


@pytest.mark.parametrize("sets, split, val_fraction, has_val", [
    (["eval_every=5"], "train", 0.25, True),
    (["eval_every=0"], "train", 0.25, False),  # no evaluation: no held-out source
    (["eval_every=5"], "val", 0.25, False),    # training on val: nothing held out of it
    (["eval_every=5"], "train", 0.0, False),   # no val images
])
def test_a_held_out_source_only_when_it_is_evaluated(monkeypatch, backbones, folder, tmp_path,
                                                    sets, split, val_fraction, has_val):
    rec = Recorded(monkeypatch, backbones)
    train_from_images(folder, "effnet:lite0?name=a", tmp_path / "run", progress=False, split=split,
                      val_fraction=val_fraction, sets=sets + ["n_concepts=16", "k=2"])
    call = rec.calls[0]
    assert (call["val_source"] is not None) == has_val
    assert call["extra"]["split"] == split
    assert call["source"].paths == [e["path"] for e in list_images(
        folder, val_fraction=val_fraction, seed=0) if e["split"] == split]


def test_no_images_of_the_split_is_a_clear_error_and_the_dist_is_closed(monkeypatch, backbones,
                                                                         folder, tmp_path):
    rec = Recorded(monkeypatch, backbones)
    with exactly(f"no 'val' images in {folder}"):
        train_from_images(folder, "effnet:lite0?name=a", tmp_path / "run", progress=False,
                          split="val", val_fraction=0.0)
    assert rec.closed == 1 and rec.calls == []
    failing = Recorded(monkeypatch, backbones, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_from_images(folder, "effnet:lite0?name=a", tmp_path / "run2", progress=False)
    assert failing.closed == 1


def test_every_training_argument_reaches_the_run_config(monkeypatch, backbones, folder,
                                                        tmp_path):
    rec = Recorded(monkeypatch, backbones)
    config = tmp_path / "c.json"
    config.write_text('{"k": 3}')
    train_from_images(folder, "timm:never_built?name=a,effnet:lite0?name=bb", tmp_path / "run",
                      preset="demo", config_file=str(config), sets=["n_concepts=16"],
                      keys={"lr": 0.01}, max_steps=5, device="cpu", progress=False)
    assert rec.resolved == [(("a", "bb"), (5, 3), tmp_path / "run", "demo", str(config),
                             ["n_concepts=16"], 5, "cpu", False, {"lr": 0.01})]
    assert rec.devices == ["cpu"]
    cfg = rec.calls[0]["cfg"]
    assert (cfg.sae.k, cfg.train.lr, cfg.train.max_steps) == (3, 0.01, 5)


def test_defaults_the_cpu_no_force_and_progress(monkeypatch, backbones, folder, tmp_path):
    rec = Recorded(monkeypatch, backbones)
    train_from_images(folder, "effnet:lite0?name=a", tmp_path / "run",
                      options=StreamOptions(workers=2, stats_images=9),
                      sets=["n_concepts=16", "k=2"])
    call = rec.calls[0]
    assert rec.devices == ["cpu"] and rec.resolved[0][7:9] == (None, False)
    assert (call["force"], call["resume"], call["progress"]) == (False, False, True)
    assert (call["source"].workers, call["source"].stats_images, call["source"].progress) == \
        (2, 9, True)
