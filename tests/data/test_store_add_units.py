"""usae.data.store_add, in process and without a model: the backbones and the extraction are
stand-ins that record what they are given, so each value the store passes on (its dtype,
alignment, CLS choice, images, source) is followed to where it must arrive, and the join's
record, log line and refusals are checked word for word."""

from __future__ import annotations

import calendar
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import exactly
from usae.data import store_add
from usae.data.backbones import parse_spec
from usae.files import atomic_write_json
from usae.options import CacheOptions
from usae.store.store import MANIFEST, Store, acts_file, read_manifest
from usae.store.writer import store_from_arrays

N_IMAGES = 6


def _store(tmp_path, tokens: int = 4, **manifest_keys):
    """A finished store of model ``a`` (d 5), its manifest changed by ``manifest_keys``
    (``models_a``: keys for model a's entry; ``skipped``: image indices it skipped)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    store_from_arrays(path, {"a": rng.normal(size=(N_IMAGES, tokens, 5))}, dtype="float32")
    manifest = read_manifest(path)
    manifest["models"]["a"].update(manifest_keys.pop("models_a", {}))
    for i in manifest_keys.pop("skipped", ()):
        manifest["images"][i]["skipped"] = True
    manifest.update(manifest_keys)
    atomic_write_json(path / MANIFEST, manifest)
    return path


def spec(name: str, grid: int | tuple[int, int], crop: int | tuple[int, int],
         extra: int = 0) -> str:
    """A spec for ``Models``: backbone ``name`` with ``grid`` (side, or (h, w)) at its own
    input ``crop`` (side, or (h, w)); its patch is crop h // grid h; rebuilt at a square
    ``img_size``, a square grid of ``img_size // patch + extra`` (``extra``: a model whose
    grid does not follow its input exactly)."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    return f"timm:{h}x{w}-{ch}x{cw}-{extra}?name={name}"


class Models:
    """Stands in for ``build_backbone`` on ``spec(...)`` specs; records every build as
    ``(spec text, pretrained, img_size)``."""

    def __init__(self) -> None:
        self.built: list[tuple] = []

    def __call__(self, model, pretrained=None, img_size=None):
        model = parse_spec(model) if isinstance(model, str) else model
        self.built.append((model.text, pretrained, img_size))
        grid_hw, crop_hw, extra = model.target.split("-")
        grid = tuple(int(v) for v in grid_hw.split("x"))
        crop = tuple(int(v) for v in crop_hw.split("x"))
        if img_size is not None:
            side = img_size // (crop[0] // grid[0]) + int(extra)
            grid, crop = (side, side), (img_size, img_size)
        return SimpleNamespace(name=model.name, grid=grid,
                               preprocess=SimpleNamespace(crop=crop))


class Extraction:
    """Stands in for ``build_store``: records its arguments and writes a finished staging
    store of the new models (d 3) that skips ``skip`` (the store's own skips by default)."""

    def __init__(self, skip=None) -> None:
        self.calls: list[dict] = []
        self.skip = skip

    def __call__(self, staging, entries, backbones, target, o, extra, progress, timings, dist):
        self.calls.append(dict(staging=staging, entries=entries, names=[b.name for b in backbones],
                               target=target, o=o, extra=extra, progress=progress,
                               timings=timings, dist=dist))
        rng = np.random.default_rng(1)
        store_from_arrays(staging, {b.name: rng.normal(size=(len(entries), 4, 3))
                                    for b in backbones}, dtype="float32")
        staged = read_manifest(staging)
        skip = self.skip if self.skip is not None else \
            [i for i, e in enumerate(read_manifest(staging.parent)["images"]) if e.get("skipped")]
        for i in skip:
            staged["images"][i]["skipped"] = True
        atomic_write_json(staging / MANIFEST, staged)
        return staged


class Rank:
    """A ``Dist`` stand-in: main or not, whether it was closed, and its barriers.
    ``meanwhile(n)`` is what the main rank did before it reached barrier ``n`` too."""

    made: list[Rank] = []

    def __init__(self, is_main: bool = True, device: str | None = None, meanwhile=None) -> None:
        self.is_main, self.device, self.closed = is_main, device, False
        self.meanwhile, self.barriers = meanwhile, 0

    def close(self) -> None:
        self.closed = True

    def barrier(self) -> None:
        self.barriers += 1
        if self.meanwhile is not None:
            self.meanwhile(self.barriers)

    @classmethod
    def from_env(cls, device: str = "cpu") -> Rank:
        rank = cls(True, device)
        cls.made.append(rank)
        return rank


@pytest.fixture
def stand_ins(monkeypatch):
    models, extraction, freed = Models(), Extraction(), []
    monkeypatch.setattr(store_add, "build_backbone", models)
    monkeypatch.setattr(store_add, "build_store", extraction)
    monkeypatch.setattr(store_add, "keep_freed_memory", freed.append)
    monkeypatch.setattr(store_add, "Dist", Rank)
    Rank.made = []
    return SimpleNamespace(models=models, extraction=extraction, freed=freed)


def test_the_staging_store_gets_the_stores_own_options_images_and_source(tmp_path, stand_ins):
    path = _store(tmp_path, tokens=5, models_a={"keep_cls": True}, skipped=[2],
                  source="/photos/set", align="resize_input")
    store_add.add_models(path, [spec("b", 2, 32), spec("c", 4, 64)], batch_size=3,
                         pretrained=False)
    (call,) = stand_ins.extraction.calls
    assert call["staging"] == path / ".add-b+c"
    assert call["extra"] == {"source": "/photos/set", "align": "resize_input", "adding_to": "s"}
    o = call["o"]
    assert (o.dtype, o.keep_cls, o.align, o.shard_dir, o.batch_size, o.device) == \
        ("float32", True, "resize_input", "", 3, "cpu")
    images = read_manifest(path)["images"]
    assert call["entries"] == [{k: v for k, v in e.items() if k != "skipped"} for e in images]
    assert all("skipped" not in e for e in call["entries"]) and images[2]["skipped"]
    assert call["target"] == (2, 2) and call["names"] == ["b", "c"] and call["timings"] is None
    assert call["progress"] is True, "progress is on by default, on the main rank"
    assert stand_ins.freed == ["cpu"]
    # the store's resize_input: c (4 x 4 at 64 px) is rebuilt at 32 px for the 2 x 2 grid
    assert stand_ins.models.built == [(spec("b", 2, 32), False, None),
                                      (spec("c", 4, 64), False, None),
                                      (spec("c", 4, 64), False, 32)]
    assert Rank.made[0].device == "cpu" and Rank.made[0].closed, "its own Dist is closed"
    assert call["dist"] is Rank.made[0]


def test_a_store_without_alignment_or_cls_records_is_a_resampled_one(tmp_path, stand_ins):
    path = _store(tmp_path)
    store_add.add_models(path, spec("b", 3, 48), progress=False)
    (call,) = stand_ins.extraction.calls
    assert (call["o"].align, call["o"].keep_cls) == ("resample", False)
    assert call["extra"] == {"source": None, "align": "resample", "adding_to": "s"}
    assert call["progress"] is False
    assert stand_ins.models.built == [(spec("b", 3, 48), None, None)]


def _main_joins(path, staging: str, at: int):
    """The main rank's join of ``staging``, done before it reaches barrier ``at``."""
    def meanwhile(n):
        if n == at:
            assert (path / staging).exists(), "the main rank joins after every rank saw it"
            store_add._join(path, path / staging)
    return meanwhile


def test_another_rank_has_no_bar_waits_for_the_join_and_returns_its_manifest(tmp_path,
                                                                             stand_ins):
    path = _store(tmp_path)
    other = Rank(is_main=False, meanwhile=_main_joins(path, ".add-b", at=2))
    manifest = store_add.add_models(path, spec("b", 2, 32), progress=True, dist=other)
    (call,) = stand_ins.extraction.calls
    assert call["progress"] is False and call["dist"] is other
    assert not other.closed and Rank.made == [], "the caller's Dist is the caller's to close"
    # the join is the main rank's work; this rank returns the manifest it wrote
    assert list(manifest["models"]) == ["a", "b"] and manifest == read_manifest(path)
    assert other.barriers == 2


def test_the_join_records_when_and_what_in_utc_and_logs_it(tmp_path, stand_ins, monkeypatch,
                                                           caplog):
    path = _store(tmp_path)
    previous = read_manifest(path)["content_hash"]
    monkeypatch.setenv("TZ", "JST-9")  # POSIX form: needs no tzdata
    time.tzset()
    try:
        with caplog.at_level(logging.INFO, logger="usae.data.store_add"):
            manifest = store_add.add_models(path, [spec("b", 2, 32), spec("c", 2, 32)],
                                            progress=False)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    (record,) = manifest["history"]
    assert set(record) == {"added", "at", "previous_content_hash"}
    assert record["added"] == ["b", "c"] and record["previous_content_hash"] == previous
    at = calendar.timegm(time.strptime(record["at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(at - time.time()) < 120, "the time is UTC, whatever the local zone"
    assert [r.getMessage() for r in caplog.records if r.name == "usae.data.store_add"] == \
        [f"added b, c to {path} (6 images)"]
    assert manifest == read_manifest(path) and Store(path).verify()
    assert acts_file(path, "c").exists() and not (path / ".add-b+c").exists()


def _stopped_in_the_join(tmp_path, monkeypatch):
    """A store whose addition of model b stopped inside the join (before the manifest)."""
    path = _store(tmp_path)
    monkeypatch.setattr(store_add, "atomic_write_json",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store_add.add_models(path, spec("b", 2, 32), progress=False)
    monkeypatch.setattr(store_add, "atomic_write_json", atomic_write_json)
    assert list(read_manifest(path)["models"]) == ["a"]
    return path


def test_a_join_left_pending_is_finished_by_the_main_rank_alone(tmp_path, stand_ins,
                                                                 monkeypatch):
    path = _stopped_in_the_join(tmp_path, monkeypatch)
    # the command again: another rank waits while the main rank joins, extracting nothing
    other = Rank(is_main=False, meanwhile=_main_joins(path, ".add-b", at=2))
    manifest = store_add.add_models(path, spec("b", 2, 32), dist=other)
    assert list(manifest["models"]) == ["a", "b"] and manifest == read_manifest(path)
    assert len(stand_ins.extraction.calls) == 1, "the join needed no second extraction"
    assert other.barriers == 2


def test_the_main_rank_finishes_a_pending_join_then_adds_the_new_model(tmp_path, stand_ins,
                                                                        monkeypatch):
    path = _stopped_in_the_join(tmp_path, monkeypatch)
    main = Rank()
    assert store_add.add_models(path, spec("b", 2, 32), dist=main) == read_manifest(path)
    assert list(read_manifest(path)["models"]) == ["a", "b"] and main.barriers == 2
    with exactly("the store already has model(s) ['b'] — give the new model another name "
                 "(SPEC?name=NEW)"):
        store_add.add_models(path, spec("b", 2, 32), dist=Rank())
    manifest = store_add.add_models(path, spec("c", 2, 32), dist=main)
    assert list(manifest["models"]) == ["a", "b", "c"] and main.barriers == 4


def test_a_taken_or_repeated_name_is_refused_naming_it(tmp_path, stand_ins):
    path = _store(tmp_path)
    with exactly("the store already has model(s) ['a'] — give the new model another name "
                 "(SPEC?name=NEW)"):
        store_add.add_models(path, [spec("a", 2, 32), spec("b", 2, 32)])
    # (add_models refuses repeated names in its specs; two specs may still give one name)
    with exactly("the store already has model(s) ['b', 'b'] — give the new model another "
                 "name (SPEC?name=NEW)"):
        store_add._add(path, [spec("b", 2, 32), spec("b", 2, 64)], CacheOptions(), None, False,
                       Rank())
    assert stand_ins.extraction.calls == []


@pytest.mark.parametrize("skip, was, now", [([1], "read", "skipped"), ([], "skipped", "read")])
def test_a_changed_skip_is_refused_before_anything_moves(tmp_path, monkeypatch, stand_ins,
                                                         skip, was, now):
    path = _store(tmp_path, skipped=[] if skip else [1])
    monkeypatch.setattr(store_add, "build_store", Extraction(skip=skip))
    image = read_manifest(path)["images"][1]["path"]
    with exactly(f"image {image} was {was} when the store was cached but is {now} now — its "
                 f"file changed; models ['b', 'c'] cannot be added for the same images (remove "
                 f"{path / '.add-b+c'} to start again)"):
        store_add.add_models(path, [spec("b", 2, 32), spec("c", 2, 32)])
    assert list(read_manifest(path)["models"]) == ["a"] and not acts_file(path, "b").exists()


# --- each new model must give the store's grid --------------------------------------------

def _refusal(name, grid, target):
    return (f"{name}: its token grid {list(grid)} cannot give the store's {list(target)} "
            "(grids are only resampled down, as in a cache of every model at once) — cache all "
            "the models into a new store")


@pytest.mark.parametrize("model, target", [
    (spec("m", 2, 32), (2, 2)),  # the same grid
    (spec("m", 4, 64), (2, 2)),  # larger: resampled down
    (spec("m", (2, 4), 32), (2, 3)),  # each side at least the store's same side
    (spec("m", (4, 3), 32), (2, 3)),
])
def test_with_resample_a_grid_at_least_the_stores_is_taken_as_it_is(monkeypatch, model, target):
    models = Models()
    monkeypatch.setattr(store_add, "build_backbone", models)
    (b,) = store_add._backbones_for_grid([model], target, "resample", True)
    assert b.name == "m" and models.built == [(model, True, None)], "built once, at its size"


@pytest.mark.parametrize("grid, target", [
    ((1, 1), (2, 2)),
    ((3, 2), (2, 3)),  # too narrow
    ((1, 4), (2, 3)),  # too short
])
def test_with_resample_a_smaller_grid_on_either_side_is_refused(monkeypatch, grid, target):
    monkeypatch.setattr(store_add, "build_backbone", Models())
    with exactly(_refusal("m", grid, target)):
        store_add._backbones_for_grid([spec("m", grid, 32)], target, "resample", None)


def test_resize_input_rebuilds_at_the_size_that_gives_the_stores_grid(monkeypatch):
    models = Models()
    monkeypatch.setattr(store_add, "build_backbone", models)
    # patch 64 / 4 = 16 px, so the store's 2 x 2 grid needs a 32 px input
    b, same = store_add._backbones_for_grid([spec("m", 4, 64), spec("n", 2, 32)], (2, 2),
                                            "resize_input", False)
    assert b.grid == (2, 2) and same.grid == (2, 2)
    assert models.built == [(spec("m", 4, 64), False, None), (spec("m", 4, 64), False, 32),
                            (spec("n", 2, 32), False, None)], "one already on the grid is kept"


def test_resize_input_takes_the_patch_from_the_models_height(monkeypatch):
    """A model of 16-px patches on a 64 x 96 input (grid 4 x 6): 32 px give 2 x 2."""
    models = Models()
    monkeypatch.setattr(store_add, "build_backbone", models)
    (b,) = store_add._backbones_for_grid([spec("m", (4, 6), (64, 96))], (2, 2), "resize_input",
                                         None)
    assert b.grid == (2, 2) and models.built[-1][2] == 32


def test_resize_input_cannot_give_a_grid_that_is_not_square(monkeypatch):
    """A square input gives a square grid: sized for the store's height (2 rows of 16 px),
    the model's 2 x 2 is refused for the 2 x 3 store."""
    models = Models()
    monkeypatch.setattr(store_add, "build_backbone", models)
    with exactly(_refusal("m", (2, 2), (2, 3))):
        store_add._backbones_for_grid([spec("m", 4, 64)], (2, 3), "resize_input", None)
    assert models.built[-1][2] == 32


def test_resize_input_refuses_a_model_whose_rebuilt_grid_still_differs(monkeypatch):
    monkeypatch.setattr(store_add, "build_backbone", Models())
    # at 32 px this model gives 3 x 3 tokens, not the 2 x 2 its patch size promises
    with exactly(_refusal("m", (3, 3), (2, 2))):
        store_add._backbones_for_grid([spec("m", 4, 64, 1)], (2, 2), "resize_input", None)
