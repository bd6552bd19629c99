"""usae.sae.trainer's pieces, each against a number worked out here: the learning-rate
schedule at its knots, the optimizer's settings, the metrics row and summary of a short
run, the messages of a refused run and of a second Ctrl-C."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import exactly
from tests.sae.test_train import _StopAfter
from usae.config import resolve
from usae.data.sources import ArraySource
from usae.sae import trainer as trainer_module
from usae.sae.trainer import Trainer, lr_at, make_optimizer


def _cfg(arrays, **over):
    base = {"n_concepts": 16, "k": 2, "batch_images": 4, "max_steps": 6, "log_every": 1,
            "checkpoint_every": 100}
    return resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                   {**base, **over})


@pytest.mark.parametrize("t, want", [
    (0, 0.1), (5, 0.1 + 0.9 * 5 / 10), (9, 0.1 + 0.9 * 9 / 10), (10, 1.0),
    (55, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5))), (100, 0.1), (150, 0.1),
    (32.5, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.25))),
])
def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor(t, want):
    assert lr_at(t, 10, 100, 1.0, 0.1) == pytest.approx(want, abs=1e-12)


def test_lr_without_warmup_or_span_does_not_divide_by_zero():
    assert lr_at(0, 0, 0, 2.0, 0.5) == pytest.approx(2.0)  # t == warmup: the peak
    assert lr_at(3, 0, 2, 2.0, 0.5) == pytest.approx(0.5)  # past the end: the floor
    assert lr_at(1, 0, 1, 2.0, 0.5) == pytest.approx(0.5)


def test_make_optimizer_is_adamw_with_the_configs_settings(arrays):
    tc = _cfg(arrays, lr=0.02, weight_decay=0.5).train
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p], tc)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.5 and group["fused"] is None
    fused = make_optimizer([torch.nn.Parameter(torch.zeros(3))],
                           _cfg(arrays, fused_optimizer=True).train)
    assert fused.param_groups[0]["fused"] is True


def test_a_short_run_logs_each_row_and_sums_up(arrays, tmp_path):
    cfg = _cfg(arrays, schedule="global", decoder_update="all", log_every=2)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    tokens_per_step = 4 * arrays["m0"].shape[1]
    for r in rows:
        assert set(r) == {"step", "loss", "tokens", "elapsed_s", "source", "recon", "aux",
                          "l0", "lr", "sched_t", "dead_fraction"}
        assert r["tokens"] == r["step"] * tokens_per_step
        assert r["sched_t"] == r["step"] - 1  # global: the step the lr was set for
        assert r["lr"] == pytest.approx(lr_at(r["sched_t"], 12, 6, cfg.train.lr,
                                              cfg.train.min_lr))
        assert list(r["recon"]) == list(arrays) and r["source"] in arrays
        assert r["loss"] == pytest.approx(sum(r["recon"].values()) + 0.1 * r["aux"], rel=1e-4)
        assert 0 <= r["dead_fraction"] <= 1
    s = t.summary()
    assert s == {"run": str(tmp_path / "r"), "steps": 6, "total_steps": 6,
                 "tokens": 6 * tokens_per_step, "elapsed_s": round(t.elapsed, 2),
                 "tokens_per_s": round(6 * tokens_per_step / t.elapsed), "loss": rows[-1]["loss"],
                 "recon": rows[-1]["recon"], "val_r2": None}


def test_the_per_model_schedule_logs_the_source_models_own_count(arrays, tmp_path):
    cfg = _cfg(arrays, max_steps=8)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    seen = {m: 0 for m in arrays}
    for r in rows:
        seen[r["source"]] += 1
        assert r["sched_t"] == seen[r["source"]] - 1
    assert t.sched_counts == [seen[m] for m in arrays] and sum(t.sched_counts) == 8


def test_dead_fraction_counts_concepts_silent_for_too_many_tokens(arrays, tmp_path):
    cfg = _cfg(arrays, aux="gao", dead_after_tokens=10**9, max_steps=2)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays))
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])[
        "dead_fraction"] == 0.0
    t.since_fired[:4] = 10**9
    out = t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    row = t._metrics_row(out)
    fired_now = int((t.since_fired == 0).sum())
    assert row["dead_fraction"] == pytest.approx(float((t.since_fired >= 10**9).float().mean()))
    assert fired_now > 0


def test_a_run_with_other_data_is_refused_naming_the_difference(arrays, tmp_path):
    cfg = _cfg(arrays)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    swapped = {m: arrays[m] for m in reversed(list(arrays))}
    with exactly(f"data has models {list(swapped)} but the config has {list(arrays)}"):
        t.fit(ArraySource(swapped))
    few = {m: a[:3] for m, a in arrays.items()}
    with exactly("the training data has 3 images, fewer than one batch of 4 — lower "
                "batch_images"):
        t.fit(ArraySource(few))
    assert t._check_source(ArraySource({m: a[:4] for m, a in arrays.items()})) == 1
    assert t.total_steps(ArraySource(arrays)) == 6


def test_cuda_without_cuda_is_refused_before_anything(arrays, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with exactly("device 'cuda:1' requested but CUDA is not available — use --device cpu"):
        Trainer(_cfg(arrays, device="cuda:1"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_second_ctrl_c_says_what_was_kept(arrays, tmp_path):
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
    t.step = 5
    assert t._abort_message() == ("stopped at once at step 5, before the first checkpoint: "
                                  "nothing was saved — re-run without --resume (with --force) "
                                  "to start again")
    (tmp_path / "r").mkdir()
    t.save_checkpoint()
    t.step = 9
    assert t._abort_message() == ("stopped at once at step 9; the last checkpoint (step 5) was "
                                  "kept — re-run with --resume to continue from it")


def test_a_ctrl_c_mid_step_carries_that_message(arrays, tmp_path):
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
    with pytest.raises(KeyboardInterrupt) as info:
        t.fit(_StopAfter(ArraySource(arrays), 2))  # Ctrl-C while the third batch is read
    assert str(info.value).startswith("stopped at once at step 2")


def test_the_checkpoint_records_the_position(arrays, tmp_path):
    from usae.sae.checkpoint import read_checkpoint_position

    cfg = _cfg(arrays, max_steps=3)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays))
    pos = read_checkpoint_position(tmp_path / "r" / "checkpoint.safetensors")
    assert pos["step"] == 3 and pos["tokens"] == t.tokens and pos["sched_counts"] == \
        t.sched_counts
    assert pos["elapsed_s"] == pytest.approx(t.elapsed) and pos["threads"] == \
        torch.get_num_threads()
    status = json.loads((tmp_path / "r" / "config.json").read_text())["status"]
    assert status == {"state": "final", "step": 3, "total_steps": 3}


def test_a_rank_other_than_0_writes_nothing(arrays, tmp_path):
    from usae.distributed import Dist

    t = Trainer(_cfg(arrays), tmp_path / "r", progress=True, dist=Dist(rank=1, world=1))
    assert t.progress is False  # only rank 0 draws a bar
    t.save_checkpoint()
    assert not (tmp_path / "r").exists()


def test_the_progress_bar_starts_where_a_resume_starts(arrays, tmp_path, progress_bars):
    bars = progress_bars(trainer_module)
    cfg = _cfg(arrays, max_steps=5, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "r", progress=True).fit(_StopAfter(ArraySource(arrays), 3))
    assert bars[0].kw == {"total": 5, "initial": 0, "desc": "train", "unit": "step",
                          "disable": False}
    assert bars[0].n == 3 and set(bars[0].postfix) == {"loss", "tok_s", "refresh"}
    Trainer(cfg, tmp_path / "r", progress=True).fit(ArraySource(arrays), resume=True)
    assert bars[1].kw["initial"] == 3 and bars[1].kw["total"] == 5 and bars[1].n == 2
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays), resume=True)
    assert bars[2].kw["disable"] is True  # (finished: nothing to draw)


def test_checkpoints_land_at_their_interval_and_at_the_end_once(arrays, tmp_path,
                                                                monkeypatch):
    """checkpoint_every 4 over 6 steps: step 4, then the final step 6, each once; the config
    says partial at 4 and final at 6."""
    saved = []
    real = Trainer.save_checkpoint

    def record(self):
        real(self)
        saved.append((self.step, json.loads((tmp_path / "r" / "config.json").read_text())
                      ["status"]["state"]))

    monkeypatch.setattr(Trainer, "save_checkpoint", record)
    Trainer(_cfg(arrays, checkpoint_every=4), tmp_path / "r", progress=False) \
        .fit(ArraySource(arrays))
    assert saved == [(4, "partial"), (6, "final")]


def test_the_extra_record_is_in_every_config_and_elapsed_time_adds_up(arrays, tmp_path):
    extra = {"stream": {"source": "imgs", "images": 4}}
    t = Trainer(_cfg(arrays, checkpoint_every=3), tmp_path / "r", progress=False,
                extra_config=extra)
    t.fit(ArraySource(arrays))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["stream"] == extra["stream"]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    # a running total (each step takes milliseconds), not the last step's own time
    assert elapsed[0] > 0 and all(b > a for a, b in zip(elapsed, elapsed[1:]))
    assert all(v == round(v, 4) for v in elapsed)
    assert elapsed[-1] == pytest.approx(t.elapsed, abs=1e-4)
