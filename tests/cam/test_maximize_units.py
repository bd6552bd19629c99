"""usae.cam.maximize, piece by piece and without a backbone: crops, the optimization loop on a
stand-in model whose gradient is known, the natural scales against NumPy's quantiles, the
firing rates and the control concept by hand, and the files read back."""

from __future__ import annotations

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
    store = store_from_arrays(tmp_path_factory.mktemp("s") / "store", arrays, dtype="float32")
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                  {"n_concepts": 24, "k": 3})
    torch.manual_seed(0)
    sae = UniversalSAE(cfg.sae).eval()
    for m, a in arrays.items():
        x = torch.from_numpy(a.reshape(-1, a.shape[2])).float()
        sae.set_standardization(m, x.mean(0), x.std(0))
    return sae, store, arrays


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
    read = []
    real = type(store).read
    monkeypatch.setattr(type(store), "read", lambda self, m, rows: read.append(len(rows)) or
                        real(self, m, rows))
    maximize.natural_scales(sae, store, [1], max_images=7)
    assert read == [7] * len(arrays)


def test_a_concept_with_no_spread_is_floored(sae_and_store, monkeypatch):
    sae, store, _ = sae_and_store
    real = sae.pre_activations

    def flat_concept_3(m, x):
        pre = real(m, x).clone()
        pre[:, 3] = 0.5
        return pre

    monkeypatch.setattr(sae, "pre_activations", flat_concept_3)
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
