"""usae.cam.maximize, piece by piece and without a backbone: crops, the optimization loop on a
stand-in model whose gradient is known, the natural scales against NumPy's quantiles, the
firing rates and the control concept by hand, and the files read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from usae.cam import maximize
from usae.cam.spectrum import analytic_spectrum
from usae.config import resolve
from usae.errors import UsaeError
from usae.options import CamOptions
from usae.sae.model import UniversalSAE
from usae.store.writer import store_from_arrays


# ---- crops ------------------------------------------------------------------------------
def test_random_crops_are_seeded_sized_noisy_and_clamped():
    x = torch.rand(1, 3, 32, 32)
    a = maximize.random_crops(x, 5, (16, 16), torch.Generator().manual_seed(1), 0.0)
    b = maximize.random_crops(x, 5, (16, 16), torch.Generator().manual_seed(1), 0.0)
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b)
    noisy = maximize.random_crops(x, 5, (16, 16), torch.Generator().manual_seed(1), 0.5)
    assert not torch.equal(noisy, a)
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1 and \
        (noisy == 0).any() and (noisy == 1).any()  # noise this large is clamped at both ends


@pytest.fixture
def crop_sides(monkeypatch):
    """The side of every crop random_crops cuts (before resizing)."""
    sides = []
    real = maximize.F.interpolate

    def spy(crop, **kw):
        sides.append(tuple(crop.shape[-2:]))
        return real(crop, **kw)

    monkeypatch.setattr(maximize.F, "interpolate", spy)
    return sides


def test_crops_are_squares_of_a_quarter_to_all_of_the_area(crop_sides):
    maximize.random_crops(torch.rand(1, 3, 20, 20), 200, (8, 8),
                          torch.Generator().manual_seed(0), 0.0)
    assert all(h == w and 10 <= h <= 20 for h, w in crop_sides)  # sqrt(0.25) x 20 = 10
    assert max(h for h, _ in crop_sides) >= 19 and min(h for h, _ in crop_sides) <= 11


def test_a_crop_never_falls_below_8_pixels(crop_sides):
    maximize.random_crops(torch.rand(1, 3, 12, 12), 100, (4, 4),
                          torch.Generator().manual_seed(2), 0.0)
    assert min(h for h, _ in crop_sides) == 8 and max(h for h, _ in crop_sides) <= 12


# ---- the optimization on a model whose gradient is known --------------------------------
class Brightness:
    """A stand-in CamModel: concept 0 is the mean red value, concept 1 minus it."""

    def __init__(self, crop=(8, 8)):
        self.crop = crop
        self.mean = torch.zeros(1, 3, 1, 1)
        self.calls = []

    def pre_activations(self, x01_bchw):
        self.calls.append(tuple(x01_bchw.shape))
        red = x01_bchw[:, 0].mean((1, 2))
        return torch.stack([red, -red], 1)


def test_optimize_raises_the_concept_and_keeps_a_seeded_trace():
    spectrum = analytic_spectrum(32)
    o = CamOptions(steps=23, size=32, crops=2, lr=0.1, noise=0.0, seed=3)
    model = Brightness()
    up = maximize.optimize(model, 0, spectrum, o, progress=False)
    assert model.calls == [(2, 3, 8, 8)] * 23
    assert [t[0] for t in up["trace"]] == [0, 10, 20, 22]
    assert up["trace"][-1][1] > up["trace"][0][1]
    assert up["image"].shape == (3, 32, 32) and up["alpha"].shape == (32, 32)
    assert float(up["alpha"].min()) >= 0 and float(up["alpha"].sum()) > 0
    down = maximize.optimize(Brightness(), 1, spectrum, o, progress=False)
    assert float(down["image"][0].mean()) < float(up["image"][0].mean())
    again = maximize.optimize(Brightness(), 0, spectrum, o, progress=False)
    assert torch.equal(again["image"], up["image"]) and again["trace"] == up["trace"]
    start = maximize.optimize(Brightness(), 0, spectrum, CamOptions(steps=1, size=32, seed=3),
                              progress=False)
    first = spectrum.image(spectrum.random_phase(torch.Generator().manual_seed(3)))
    assert start["trace"][0][1] == pytest.approx(float(first[0, 0].mean()), abs=0.1)


def test_the_trace_rounds_to_six_places():
    o = CamOptions(steps=1, size=32, crops=1, noise=0.0)
    trace = maximize.optimize(Brightness(), 0, analytic_spectrum(32), o, progress=False)["trace"]
    assert trace[0][1] == round(trace[0][1], 6)


# ---- measurements on a real store and run -----------------------------------------------
@pytest.fixture(scope="module")
def sae_and_store(tmp_path_factory, make_arrays):
    arrays = make_arrays(n_images=20, tokens=3)
    store, sae = _store_and_sae(tmp_path_factory.mktemp("s"), arrays, seed=0)
    for m, a in arrays.items():
        x = torch.from_numpy(a.reshape(-1, a.shape[2])).float()
        sae.set_standardization(m, x.mean(0), x.std(0))
    return sae, store, arrays


def _store_and_sae(folder, arrays, seed: int):
    """A float32 store of ``arrays`` and a seeded 24-concept SAE (k 3) for its models."""
    store = store_from_arrays(folder / "store", arrays, dtype="float32")
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                  {"n_concepts": 24, "k": 3})
    torch.manual_seed(seed)
    return store, UniversalSAE(cfg.sae).eval()


def reads(monkeypatch, store) -> list[list[int]]:
    """The rows of each ``store.read``, in order (the reads still happen)."""
    read: list[list[int]] = []
    real = type(store).read
    monkeypatch.setattr(type(store), "read", lambda self, m, rows: read.append(list(rows)) or
                        real(self, m, rows))
    return read


def _token_means(sae, m, a):
    x = torch.from_numpy(a).float()
    n, t, d = x.shape
    with torch.no_grad():
        pre = sae.pre_activations(m, sae.standardize(m, x.reshape(n * t, d)))
    return pre.reshape(n, t, -1).mean(1).double().numpy()


def test_natural_scales_are_numpys_quantiles_with_the_floor(sae_and_store):
    sae, store, arrays = sae_and_store
    got = maximize.natural_scales(sae, store, [2, 5])
    for m, a in arrays.items():
        means = _token_means(sae, m, a)
        median, q99 = np.quantile(means, 0.5, axis=0), np.quantile(means, 0.99, axis=0)
        floor = max(0.1 * float(np.median(q99 - median)), 1e-6)
        assert sorted(got[m]) == [2, 5]
        for k in (2, 5):
            want = {"median": round(float(median[k]), 6), "q99": round(float(q99[k]), 6),
                    "scale": round(max(float(q99[k] - median[k]), floor), 6),
                    "floored": bool(q99[k] - median[k] < floor)}
            assert got[m][k] == pytest.approx(want, abs=2e-6)
            assert got[m][k]["floored"] == want["floored"]


def test_natural_scales_reads_at_most_max_images(sae_and_store, monkeypatch):
    sae, store, arrays = sae_and_store
    read = reads(monkeypatch, store)
    maximize.natural_scales(sae, store, [1], max_images=7)
    assert [len(r) for r in read] == [7] * len(arrays)


def flatten(monkeypatch, sae, concept: int, value: float) -> None:
    """Make ``concept``'s pre-activation ``value`` on every token: a concept with no spread."""
    real = sae.pre_activations

    def flat(m, x):
        pre = real(m, x).clone()
        pre[:, concept] = value
        return pre

    monkeypatch.setattr(sae, "pre_activations", flat)


def test_a_concept_with_no_spread_is_floored(sae_and_store, monkeypatch):
    sae, store, _ = sae_and_store
    flatten(monkeypatch, sae, 3, 0.5)
    got = maximize.natural_scales(sae, store, [3])
    for m in got:
        assert got[m][3]["floored"] is True and got[m][3]["median"] == 0.5
        assert got[m][3]["scale"] > 0


def test_the_floor_samples_a_thousand_concepts_when_there_are_more(monkeypatch,
                                                                   sae_and_store):
    sae, store, _ = sae_and_store
    monkeypatch.setattr(maximize, "FLOOR_SAMPLE", 10)
    got = maximize.natural_scales(sae, store, [0])
    sample = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:10]
    for m, a in sae_and_store[2].items():
        means = _token_means(sae, m, a)
        spread = np.quantile(means, 0.99, axis=0) - np.quantile(means, 0.5, axis=0)
        floor = max(0.1 * float(np.median(spread[sample.numpy()])), 1e-6)
        assert got[m][0]["scale"] == pytest.approx(max(float(spread[0]), floor), abs=2e-6)


def test_robust_score():
    scale = {"median": 2.0, "scale": 4.0}
    assert maximize.robust_score(2.0, scale) == 0.0
    assert maximize.robust_score(6.0, scale) == 1.0
    assert maximize.robust_score(0.0, scale) == -0.5


def test_firing_rates_average_the_models_fractions(sae_and_store):
    sae, store, arrays = sae_and_store
    rates = maximize.firing_rates(sae, store, images=5)
    want = np.zeros(24)
    for m, a in arrays.items():
        x = torch.from_numpy(a[:5].reshape(-1, a.shape[2])).float()
        with torch.no_grad():
            want += (sae.encode(m, x) > 0).double().mean(0).numpy()
    np.testing.assert_allclose(rates.numpy(), want / len(arrays))
    assert rates.dtype == torch.float64


def test_the_control_is_a_seeded_pick_of_the_nearest_rates_in_log_space():
    rates = torch.tensor([0.1, 0.001, 0.01, 0.02, 0.5, 0.0, 0.011, 0.3])
    # median of concepts 0 and 2 (0.1, 0.01): torch's lower median 0.01; nearest in log space
    # excluding 0 and 2: 0.011, 0.02, 0.001, 0.3 ...
    log_distance = (torch.log(rates.clamp_min(1e-9)) - np.log(0.01)).abs()
    log_distance[[0, 2]] = float("inf")
    order = torch.argsort(log_distance, stable=True).tolist()
    for seed in range(6):
        pick = maximize.matched_control(rates, [0, 2], seed, pool=3)
        assert pick in order[:3]
        assert pick == order[:3][int(np.random.default_rng([seed, 31337]).integers(3))]
    assert maximize.matched_control(rates, [0, 2], 0, pool=1) == 6  # 0.011 is the nearest


# ---- files ------------------------------------------------------------------------------
def test_save_png_rounds_to_8_bits_and_clamps(tmp_path):
    image = torch.tensor([[[0.0, 0.5], [1.0, 1.7]], [[-0.2, 0.25], [0.75, 0.1]],
                          [[0.999, 0.002], [0.5, 0.0]]])
    maximize.save_png(tmp_path / "x.png", image)
    back = np.asarray(Image.open(tmp_path / "x.png"))
    assert back.shape == (2, 2, 3) and back.dtype == np.uint8
    assert back[:, :, 0].tolist() == [[0, 128], [255, 255]]
    assert back[:, :, 1].tolist() == [[0, 64], [191, 26]]
    assert back[:, :, 2].tolist() == [[255, 1], [128, 0]]


def test_save_alpha_scales_to_its_maximum(tmp_path):
    maximize.save_alpha(tmp_path / "a.png", torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert Image.open(tmp_path / "a.png").mode == "L"
    assert back.tolist() == [[0, 64], [128, 255]]
    maximize.save_alpha(tmp_path / "z.png", torch.zeros(2, 3))
    assert np.asarray(Image.open(tmp_path / "z.png")).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_save_grid_puts_each_model_then_the_readable_naturals_in_a_row(tmp_path):
    colours = {"a": (255, 0, 0), "b": (0, 255, 0)}
    pngs = {}
    for m, c in colours.items():
        pngs[m] = tmp_path / f"{m}.png"
        Image.new("RGB", (30, 30), c).save(pngs[m])
    Image.new("RGB", (50, 20), (0, 0, 255)).save(tmp_path / "nat.jpg")
    maximize.save_grid(tmp_path / "grid.png", pngs,
                       [str(tmp_path / "nat.jpg"), str(tmp_path / "gone.jpg")], tile=10)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (10, 30, 3)
    assert grid[5, 5].tolist() == [255, 0, 0] and grid[5, 15].tolist() == [0, 255, 0]
    assert grid[5, 25, 2] > 200 and grid[5, 25, 0] < 50  # the natural, resized to the tile


def test_summaries_are_off_diagonal_means_or_null_for_one_model():
    checks = {"transfer": [[9.0, 1.0], [3.0, 9.0]], "transfer_control": [[5.0]]}
    assert maximize._summaries(checks) == {"transfer_offdiag_mean": 2.0,
                                           "transfer_control_offdiag_mean": None}
    three = {"transfer": [[0, 1, 2], [3, 0, 4], [5, 6, 0]], "transfer_control": [[1, 1 / 3],
                                                                                  [0, 1]]}
    assert maximize._summaries(three) == {"transfer_offdiag_mean": 3.5,
                                          "transfer_control_offdiag_mean": 0.1667}


def test_top_rows_reads_the_evals_mean_ranking(tmp_path):
    from safetensors.torch import save_file

    assert maximize._top_rows(None) is None
    assert maximize._top_rows(tmp_path) is None  # an eval without top images
    rows = torch.tensor([[3, 1], [0, -1]])
    save_file({"rows.mean": rows, "rows.max": rows * 0}, str(tmp_path / "top_images.safetensors"))
    assert torch.equal(maximize._top_rows(str(tmp_path)), rows)


def test_cam_needs_a_store_with_backbone_specs(sae_and_store, tmp_path):
    sae, store, _ = sae_and_store
    with pytest.raises(UsaeError) as info:
        maximize.check_run_and_store(sae, tmp_path, store)
    assert str(info.value) == (f"model {sae.models[0]!r} of {store.path} has no backbone spec "
                               "(an imported or in-memory store); CAM needs a store made by "
                               "`usae cache`")


def test_a_hub_run_needs_an_out_folder():
    with pytest.raises(UsaeError) as info:
        maximize.run_cam("hf://me/run", "S", concepts=[1])
    assert str(info.value) == ("hf://me/run is a Hub run, whose folder is the Hub's download "
                               "cache — pass --out DIR for the images")


def test_the_measure_is_described_as_computed():
    assert "(activation - natural median) / scale" in maximize.MEASURE
    assert "0.1 x the model's median spread" in maximize.MEASURE
    assert f"{maximize.FLOOR_FRACTION} x the model's median spread" in maximize.MEASURE


# ---- a natural image through the cache's path --------------------------------------------
def score_through_the_cache(sae, backbone, img, keep_cls: bool):
    """The oracle: (n,) the token-mean pre-activations of ``img`` by the cache's own path
    (preprocess_image, extract_batch), then the run's standardization and encoder."""
    from usae.data.cache import extract_batch
    from usae.data.images import preprocess_image

    px = preprocess_image(img, backbone.preprocess)[None]
    acts = extract_batch([backbone], {backbone.name: px}, (2, 2), keep_cls)[backbone.name][0]
    with torch.no_grad():
        return sae.pre_activations(backbone.name,
                                   sae.standardize(backbone.name, acts)).mean(0)


def test_a_natural_image_scores_what_the_cache_would_store(sae_and_store):
    """CamModel.natural (PIL preprocessing, back to [0, 1], the model's normalization) against
    the cache's own path: preprocess_image, extract_batch, then the run's encoder."""
    from torch import nn

    from usae.data.backbones.adapters import GenericBackbone
    from usae.data.backbones.base import IMAGENET, Preprocess

    sae, _, _ = sae_and_store
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 12, 8, stride=8))
    backbone = GenericBackbone(net, "0", Preprocess(crop=(16, 16), resize=16,
                                                    mean=IMAGENET[0], std=IMAGENET[1]),
                               name="m0")
    model = maximize.CamModel(backbone, sae, (2, 2), False)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), np.uint8))
    torch.testing.assert_close(model.natural(img),
                               score_through_the_cache(sae, backbone, img, False),
                               rtol=1e-5, atol=1e-5)


# ---- natural scales: batches, rounding and the seeded floor sample ---------------------
@pytest.fixture(scope="module")
def big_store(tmp_path_factory, make_arrays):
    """150 images (three read batches of 64, the last short)."""
    arrays = make_arrays(n_images=150, tokens=2)
    store, sae = _store_and_sae(tmp_path_factory.mktemp("big"), arrays, seed=1)
    return sae, store, arrays


def test_natural_scales_read_every_image_once_in_batches_of_64(big_store, monkeypatch):
    sae, store, arrays = big_store
    read = reads(monkeypatch, store)
    got = maximize.natural_scales(sae, store, [1, 4, 9])
    per_model = len(read) // len(arrays)
    assert [len(r) for r in read[:per_model]] == [64, 64, 22]
    assert sum(read[:per_model], []) == list(range(150))
    for m, a in arrays.items():
        means = _token_means(sae, m, a)
        median, q99 = np.quantile(means, 0.5, axis=0), np.quantile(means, 0.99, axis=0)
        for k in (1, 4, 9):
            got_k = got[m][k]
            assert got_k["median"] == pytest.approx(float(median[k]), abs=1e-6)
            assert got_k["q99"] == pytest.approx(float(q99[k]), abs=1e-6)
            for key in ("median", "q99", "scale"):  # six decimals, as cam.json says
                assert got_k[key] == round(got_k[key], 6)
    assert any(round(v, 5) != v for m in got for k in got[m] for v in
               (got[m][k]["median"], got[m][k]["q99"]))  # the sixth place is kept


def test_the_floor_of_a_flat_concept_is_the_seeded_samples_median(monkeypatch,
                                                                 sae_and_store):
    sae, store, arrays = sae_and_store
    monkeypatch.setattr(maximize, "FLOOR_SAMPLE", 10)
    flatten(monkeypatch, sae, 0, 0.25)
    got = maximize.natural_scales(sae, store, [0])
    for m, a in arrays.items():
        means = _token_means(sae, m, a)  # (concept 0 flat already)
        spread = np.quantile(means, 0.99, axis=0) - np.quantile(means, 0.5, axis=0)

        def floor(seed):
            sample = torch.randperm(24, generator=torch.Generator().manual_seed(seed))[:10]
            lower_median = np.sort(spread[sample.numpy()])[4]  # torch's median of 10
            return max(0.1 * float(lower_median), 1e-6)

        assert got[m][0]["scale"] == pytest.approx(floor(0), abs=2e-6)
        assert got[m][0]["floored"] is True
        assert any(abs(floor(s) - floor(0)) > 1e-4 for s in range(1, 6))  # the seed matters


# ---- files -------------------------------------------------------------------------------
def test_save_alpha_scales_any_positive_maximum_and_leaves_zeros_quietly(tmp_path):
    import warnings

    maximize.save_alpha(tmp_path / "h.png", torch.tensor([[0.25, 0.5]]))
    assert np.asarray(Image.open(tmp_path / "h.png")).tolist() == [[128, 255]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 on the way
        maximize.save_alpha(tmp_path / "z.png", torch.zeros(1, 2))
    assert np.asarray(Image.open(tmp_path / "z.png")).tolist() == [[0, 0]]


def test_save_grid_skips_an_unreadable_natural_and_keeps_the_next(tmp_path):
    pngs = {"a": tmp_path / "a.png"}
    Image.new("RGB", (8, 8), (255, 0, 0)).save(pngs["a"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "nat.png")
    maximize.save_grid(tmp_path / "g.png", pngs, [str(tmp_path / "bad.jpg"),
                                                  str(tmp_path / "nat.png")])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (160, 320, 3)  # tiles of 160 px by default
    assert (grid[0, :160] == [255, 0, 0]).all() and (grid[0, 160:] == [0, 0, 255]).all()
    assert (grid[159] == grid[0]).all()  # each tile from the top row to the bottom one


@pytest.mark.parametrize("seed", range(40))
def test_the_control_pool_is_the_eight_nearest(seed):
    rates = torch.tensor([0.01 * 1.5 ** i for i in range(20)])  # distinct, increasing
    ks = [10]  # the target rate is concept 10's; the nearest are 9, 11, 8, 12, ...
    distance = (torch.log(rates) - torch.log(rates[10])).abs()
    distance[10] = float("inf")
    nearest = torch.argsort(distance, stable=True)[:8].tolist()
    pick = maximize.matched_control(rates, ks, seed)
    assert pick == nearest[int(np.random.default_rng([seed, 31337]).integers(8))]


def test_the_control_breaks_ties_by_concept_order():
    rates = torch.tensor([0.5] * 40 + [0.1] * 40)
    # concept 79's rate is 0.1: the nearest are the other 0.1 concepts, lowest ids first
    picks = {maximize.matched_control(rates, [79], seed) for seed in range(30)}
    assert picks == set(range(40, 48))


def test_the_default_samples_of_images(sae_and_store, monkeypatch):
    """natural_scales reads at most 4096 images by default, firing_rates 256."""
    sae, store, arrays = sae_and_store
    read = []
    monkeypatch.setattr(type(store), "rows", lambda self, split: list(range(5000)))
    monkeypatch.setattr(type(store), "read", lambda self, m, rows: read.append(len(rows)) or
                        torch.zeros(len(rows), 3, self.dims[self.models.index(m)]))
    maximize.natural_scales(sae, store, [0])
    assert sum(read) == 4096 * len(arrays)
    read.clear()
    maximize.firing_rates(sae, store)
    assert read == [256] * len(arrays)


# ---- run_cam: each part followed to what it is given -----------------------------------
class RedConcepts:
    """A stand-in CamModel: concept c is the mean red value times weight c (the natural image
    read as 8-bit RGB, the optimized one as pixels in [0, 1])."""

    def __init__(self, n: int, sign: float) -> None:
        self.crop, self.mean = (8, 8), torch.zeros(1, 3, 1, 1)
        self.weights = torch.linspace(-1, 1, n, dtype=torch.float64) * sign

    def pre_activations(self, x01_bchw):
        return x01_bchw[:, 0].mean((1, 2))[:, None] * self.weights.float()[None]

    def natural(self, img):
        red = float(np.asarray(img, dtype=np.float64)[:, :, 0].mean() / 255)
        return (red * self.weights).float()


def test_run_cam_hands_each_part_its_inputs_and_writes_what_they_return(
        sae_and_store, monkeypatch, tmp_path):
    from usae.data.images import load_rgb

    sae, store, _ = sae_and_store
    run = tmp_path / "run"
    run.mkdir()
    o = CamOptions(steps=2, size=32, crops=1, seed=4, spectrum_images=7)
    calls: dict[str, list] = {}

    def record(name, result=None):
        return lambda *a, **kw: calls.setdefault(name, []).append((a, kw)) or result

    spectrum = analytic_spectrum(32)

    class Moved:
        def to(self, device):
            calls.setdefault("spectrum.to", []).append(device)
            return spectrum

    models = {m: RedConcepts(sae.cfg.n, 1.0 if i == 0 else -0.5)
              for i, m in enumerate(sae.models)}
    monkeypatch.setattr(maximize, "keep_freed_memory", record("memory"))
    monkeypatch.setattr(maximize.UniversalSAE, "load", record("load", sae))
    monkeypatch.setattr(maximize, "check_run_and_store", record("check"))
    monkeypatch.setattr(maximize, "pick_concepts", record("pick", [2, 5]))
    monkeypatch.setattr(maximize, "load_or_estimate_spectrum", record("spectrum", Moved()))
    monkeypatch.setattr(maximize, "build_cam_models", record("build", models))
    real_optimize = maximize.optimize
    monkeypatch.setattr(maximize, "optimize", lambda model, k, spec, opts, desc, progress:
                        calls.setdefault("optimize", []).append((k, desc, progress)) or
                        real_optimize(model, k, spec, opts, progress=False))
    docs = maximize.run_cam(run, store.path, concepts=[5, 2], options=o)

    out = run / "cam"  # the default folder
    assert calls["memory"] == [(("cpu",), {})]
    assert calls["load"] == [((run,), {"device": "cpu"})]
    (check_args, _), = calls["check"]
    assert check_args[:2] == (sae, run) and check_args[2].path == store.path
    assert calls["pick"] == [((sae, run, store.path, [5, 2], None, None, True),
                              {"ranking_dir": out / "ranking-eval"})]
    (spec_args, _), = calls["spectrum"]
    assert spec_args[1:] == (out / "spectrum.safetensors", 32, 7)
    assert calls["spectrum.to"] == [torch.device("cpu")]
    assert calls["build"][0][0][2] == torch.device("cpu")
    rates = maximize.firing_rates(sae, store)
    control = maximize.matched_control(rates, [2, 5], o.seed)
    scales = maximize.natural_scales(sae, store, sorted({2, 5, control}))
    names = list(models)
    assert calls["optimize"] == [(k, f"cam {k} {m}", True) for k in (control, 2, 5)
                                 for m in names]

    def checks(folder, k):
        seen = [[float(models[j].natural(load_rgb(folder / f"{m}.png"))[k]) for j in names]
                for m in names]
        score = lambda v, m: round((v - scales[m][k]["median"]) / scales[m][k]["scale"], 4)  # noqa: E731
        return ({m: score(seen[i][i], m) for i, m in enumerate(names)},
                [[score(seen[i][j], v) for j, v in enumerate(names)] for i in range(len(names))])

    _, control_transfer = checks(out / "control", control)
    assert sorted(docs) == [2, 5]
    for k in (2, 5):
        doc = json.loads((out / str(k) / "cam.json").read_text())
        assert doc == docs[k]
        self_ratio, transfer = checks(out / str(k), k)
        assert doc["self_ratio"] == self_ratio and doc["transfer"] == transfer
        assert doc["transfer_control"] == control_transfer
        assert any(v != round(v, 3) for row in transfer for v in row)  # four places kept
        assert doc["natural"] == {m: scales[m][k] for m in names}
        assert (doc["concept"], doc["control_concept"]) == (k, control)
        assert doc["firing_rate"] == round(float(rates[k]), 6)
        assert doc["control_firing_rate"] == round(float(rates[control]), 6)
        assert doc["settings"] == o.to_json() and doc["measure"] == maximize.MEASURE
        assert doc["spectrum"] == spectrum.source
        assert doc["trace"] == {m: real_optimize(models[m], k, spectrum, o,
                                                 progress=False)["trace"] for m in names}
        assert doc["transfer_offdiag_mean"] == maximize._summaries(doc)["transfer_offdiag_mean"]
        grid = Image.open(out / str(k) / "grid.png")
        assert grid.size == (160 * len(names), 160)  # no eval: the models' images alone


# ---- the second batch: crops replayed, the loop's bar and alpha, the models' wiring -------
def test_random_crops_replay_the_generator_draw_by_draw():
    """Each crop from its three draws (side, top, left), resized with antialiasing, then one
    noise draw for the batch: the same generator replayed here gives the same batch."""
    import math

    import torch.nn.functional as F

    x = torch.arange(3 * 24 * 24, dtype=torch.float32).reshape(1, 3, 24, 24) / (3 * 576)
    got = maximize.random_crops(x, 6, (8, 8), torch.Generator().manual_seed(5), 0.3)
    gen = torch.Generator().manual_seed(5)
    want = []
    for _ in range(6):
        side = int(24 * math.sqrt(0.25 + 0.75 * float(torch.rand((), generator=gen))))
        side = max(8, min(24, side))
        y0 = int(torch.randint(0, 24 - side + 1, (), generator=gen))
        x0 = int(torch.randint(0, 24 - side + 1, (), generator=gen))
        want.append(F.interpolate(x[:, :, y0:y0 + side, x0:x0 + side], size=(8, 8),
                                  mode="bilinear", align_corners=False, antialias=True))
    batch = torch.cat(want)
    torch.testing.assert_close(got, (batch + torch.randn(batch.shape, generator=gen) * 0.3)
                               .clamp(0, 1))


def test_crops_start_anywhere_including_the_first_row_and_column(crop_sides, monkeypatch):
    corners = []
    real = maximize.F.interpolate
    monkeypatch.setattr(maximize.F, "interpolate",
                        lambda crop, **kw: corners.append(int(crop[0, 0, 0, 0])) or
                        real(crop, **kw))
    x = torch.arange(20 * 20, dtype=torch.float32).reshape(1, 1, 20, 20).expand(1, 3, 20, 20)
    maximize.random_crops(x, 300, (4, 4), torch.Generator().manual_seed(0), 0.0)
    rows, cols = {c // 20 for c in corners}, {c % 20 for c in corners}
    assert 0 in rows and 0 in cols and max(h for h, _ in crop_sides) < 20


def test_optimize_shows_a_bar_of_its_steps_and_sums_every_steps_gradient(progress_bars):
    bars = progress_bars(maximize)
    spectrum = analytic_spectrum(32)
    o = CamOptions(steps=3, size=32, crops=1, noise=0.0, seed=1)
    three = maximize.optimize(Brightness(), 0, spectrum, o)
    [bar] = bars
    assert bar.kw == {"total": 3, "desc": "cam", "unit": "step", "disable": False,
                      "leave": False}
    assert bar.updates == [1, 1, 1] and bar.closed
    maximize.optimize(Brightness(), 0, spectrum, o, desc="cam 4 m0", progress=False)
    assert bars[1].kw["desc"] == "cam 4 m0" and bars[1].kw["disable"] is True
    one = maximize.optimize(Brightness(), 0, spectrum, CamOptions(steps=1, size=32, crops=1,
                                                                   noise=0.0, seed=1),
                            progress=False)
    # alpha: |gradient| per pixel summed over the channels and the steps
    assert (three["alpha"] >= one["alpha"] - 1e-12).all()
    assert float(three["alpha"].sum()) > float(one["alpha"].sum())
    assert float(one["alpha"].std()) > 0  # a map, not one number


class FakeStoreModels:
    """What build_cam_models reads of a store: each model's manifest entry."""

    def __init__(self, entries):
        self.entries = entries

    def model(self, m):
        from types import SimpleNamespace

        return SimpleNamespace(as_manifest=lambda: self.entries[m])


def test_build_cam_models_rebuilds_each_backbone_frozen_with_its_grid(sae_and_store,
                                                                      monkeypatch):
    from torch import nn

    from usae.data.backbones.base import Backbone, Preprocess

    sae, _, _ = sae_and_store
    entries = {m: {"spec": f"test:{m}", "aligned_grid": [2, 3], "keep_cls": i == 1}
               for i, m in enumerate(sae.models)}
    rebuilt, moved = [], []

    def rebuild(m, info):
        rebuilt.append((m, info))
        b = Backbone(name=m, spec=info["spec"], module=nn.Linear(2, 2), d=2, n_prefix=1,
                     grid=(2, 3), layer="x", preprocess=Preprocess())
        b.to = lambda device, b=b: moved.append((b.name, device)) or b
        return b

    monkeypatch.setattr(maximize, "rebuild_cached", rebuild)
    models = maximize.build_cam_models(sae, FakeStoreModels(entries), torch.device("cpu"))
    assert rebuilt == [(m, entries[m]) for m in sae.models]
    assert moved == [(m, torch.device("cpu")) for m in sae.models]
    for i, m in enumerate(sae.models):
        cam = models[m]
        assert cam.target == (2, 3) and cam.keep_cls is (i == 1) and cam.sae is sae
        assert not any(p.requires_grad for p in cam.b.module.parameters())


def test_keep_cls_reaches_the_token_alignment(sae_and_store):
    """A model with a CLS token kept: the natural score averages the CLS row too, as the
    store the run was trained on holds it."""
    from torch import nn

    from usae.data.backbones.adapters import GenericBackbone
    from usae.data.backbones.base import Preprocess

    class WithCls(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, stride=8)
            self.out = nn.Identity()

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)
            return self.out(torch.cat([t.mean(1, keepdim=True) * 3, t], 1))

    sae, _, _ = sae_and_store
    torch.manual_seed(2)
    backbone = GenericBackbone(WithCls(), "out", Preprocess(crop=(16, 16), resize=16),
                               name="m1", n_prefix=1, grid=(2, 2))
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (16, 16, 3), np.uint8))
    for keep in (True, False):
        got = maximize.CamModel(backbone, sae, (2, 2), keep).natural(img)
        torch.testing.assert_close(got, score_through_the_cache(sae, backbone, img, keep),
                                   rtol=1e-5, atol=1e-5)


def test_run_cam_shows_the_evals_top_natural_images_beside_the_cam(sae_and_store,
                                                                   monkeypatch, tmp_path):
    from safetensors.torch import save_file

    sae, store, _ = sae_and_store
    run, eval_dir = tmp_path / "run", tmp_path / "eval"
    run.mkdir()
    eval_dir.mkdir()
    top = torch.full((sae.cfg.n, 6), -1, dtype=torch.long)
    top[2] = torch.tensor([7, -1, 3, 11, 0, 5])  # the first four, less the -1
    save_file({"rows.mean": top}, str(eval_dir / "top_images.safetensors"))
    checked, grids = [], []
    monkeypatch.setattr(maximize, "keep_freed_memory", lambda device: None)
    monkeypatch.setattr(maximize.UniversalSAE, "load", lambda path, device: sae)
    monkeypatch.setattr(maximize, "check_run_and_store", lambda *a: None)
    monkeypatch.setattr(maximize, "check_eval_of_run",
                        lambda *a, **kw: checked.append((a, kw)))
    picked = []
    monkeypatch.setattr(maximize, "pick_concepts",
                        lambda *a, **kw: picked.append(a[3:6]) or [2])
    monkeypatch.setattr(maximize, "load_or_estimate_spectrum",
                        lambda *a: analytic_spectrum(32))
    monkeypatch.setattr(maximize, "build_cam_models", lambda *a: {
        m: RedConcepts(sae.cfg.n, 1.0) for m in sae.models})
    monkeypatch.setattr(maximize, "save_grid", lambda path, pngs, naturals:
                        grids.append((path, sorted(pngs), naturals)))
    maximize.run_cam(run, store.path, concepts=[2], top=3, out=tmp_path / "out",
                     eval_dir=eval_dir, progress=False, steps=1, size=32, crops=1)
    assert picked == [([2], 3, eval_dir)]  # concepts, top and the eval, as given
    assert checked == [((eval_dir, run, list(sae.models), sae.cfg.n),
                        {"need": ("report.json", "concepts.csv")})]
    images = store.manifest["images"]
    assert grids == [(tmp_path / "out" / "2" / "grid.png", sorted(sae.models),
                      [images[r]["path"] for r in (7, 3, 11)])]
