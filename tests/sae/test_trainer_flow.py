"""usae.sae.trainer's control flow, in process: a clock that the test moves (checkpoints by
wall time, the bar's throughput), a signal sent from inside a step (the stop and its
checkpoint), and a second rank played by a stand-in (what the step hands the all-reduce, and
what it takes back). Each expectation is worked out here from the rule, not read off a run."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import exactly
from tests.sae.test_trainer_units import _cfg
from usae.analysis.metrics import r2_matrix
from usae.data.sources import ArraySource
from usae.sae import trainer as trainer_module
from usae.sae.interrupts import TrainingInterrupted
from usae.sae.model import UniversalSAE
from usae.sae.trainer import Trainer


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Clock:
    """Stands in for the trainer's ``time``: both clocks read ``now``, which each training
    step moves on by ``step_s`` seconds."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 1000.0, step_s

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    def install(step_s: float) -> Clock:
        c = Clock(step_s)
        real = Trainer.train_step

        def step_then_tick(self, *a, **k):
            out = real(self, *a, **k)
            c.now += c.step_s
            return out

        monkeypatch.setattr(trainer_module, "time", c)
        monkeypatch.setattr(Trainer, "train_step", step_then_tick)
        return c
    return install


@pytest.fixture
def saves(monkeypatch):
    """The steps at which a checkpoint was written, in order."""
    steps: list[int] = []
    real = Trainer.save_checkpoint

    def record(self):
        real(self)
        steps.append(self.step)

    monkeypatch.setattr(Trainer, "save_checkpoint", record)
    return steps


# --- the clock ----------------------------------------------------------------------------

def test_a_checkpoint_also_lands_each_checkpoint_minutes_of_wall_time(arrays, tmp_path, clock,
                                                                      saves):
    """20 s a step and 2 minutes between checkpoints: steps 6 and 12 (120 s after the last
    save each), then the end (13); the step count alone (every 100) would save only at 13."""
    clock(20.0)
    Trainer(_cfg(arrays, max_steps=13, checkpoint_minutes=2), tmp_path / "r",
            progress=False).fit(ArraySource(arrays))
    assert saves == [6, 12, 13]


def test_elapsed_time_is_the_steps_own_time_and_the_bar_shows_its_throughput(
        arrays, tmp_path, clock, progress_bars):
    bars = progress_bars(trainer_module)
    clock(0.125)  # (a run shorter than a second: the throughput divides by its own time)
    t = Trainer(_cfg(arrays, max_steps=5), tmp_path / "r", progress=True)
    t.fit(ArraySource(arrays))
    tokens_per_step = 4 * arrays["m0"].shape[1]
    assert t.elapsed == 5 * 0.125 and [r["elapsed_s"] for r in _rows(tmp_path / "r")] == \
        [0.125, 0.25, 0.375, 0.5, 0.625]
    last = _rows(tmp_path / "r")[-1]
    assert bars[0].postfix == {"loss": f"{last['loss']:.4f}", "refresh": False,
                               "tok_s": f"{5 * tokens_per_step / 0.625:,.0f}"}
    assert t.summary()["tokens_per_s"] == round(5 * tokens_per_step / 0.625)


def test_elapsed_time_is_never_more_than_the_wall_time(arrays, tmp_path):
    import time

    start = time.perf_counter()
    t = Trainer(_cfg(arrays, max_steps=3), tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays))
    assert 0 < t.elapsed <= time.perf_counter() - start


# --- a stop by signal ---------------------------------------------------------------------

def _signal_after_step(monkeypatch, at: int, times: int = 1):
    """SIGINT to this process ``times`` times, right after step ``at`` is computed."""
    real = Trainer.train_step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        if self.step == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step)


def test_a_signal_stops_one_process_after_the_step_in_flight_with_a_checkpoint(
        arrays, tmp_path, monkeypatch, saves):
    _signal_after_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_cfg(arrays), tmp_path / "r", progress=False).fit(ArraySource(arrays))
    assert info.value.step == 3 and saves == [3]
    assert str(info.value) == ("SIGINT at step 3; a checkpoint of step 3 was saved — re-run "
                               "with --resume to continue")
    status = json.loads((tmp_path / "r" / "config.json").read_text())["status"]
    assert status == {"state": "partial", "step": 3, "total_steps": 6}


def test_a_second_signal_during_the_save_waits_for_it_then_stops(arrays, tmp_path,
                                                                 monkeypatch, saves):
    """A checkpoint is due at step 2 (every 2); a signal arrives during that save (a second
    one): the save lands, and the run stops there."""
    real = Trainer.save_checkpoint
    sent = []

    def save_under_signals(self):
        if self.step == 2 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # the first: a stop request
            os.kill(os.getpid(), signal.SIGINT)  # the second, while saving: pending
        real(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_under_signals)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_cfg(arrays, checkpoint_every=2), tmp_path / "r", progress=False) \
            .fit(ArraySource(arrays))
    assert info.value.step == 2 and saves == [2]


# --- another rank, played by a stand-in -------------------------------------------------

class Ranks:
    """Rank 0 of two, without a process group: records what each step hands the
    all-reduce, and answers as ``answer(step, stop, scalars)`` says the ranks agreed."""

    rank, world, local_rank, enabled, is_main = 0, 2, 0, True, True

    def __init__(self, answer=None) -> None:
        self.answer = answer or (lambda step, stop, scalars: (stop, scalars))
        self.handed: list[SimpleNamespace] = []
        self.agreed: list[tuple[str, str]] = []
        self.step = 0

    def device(self, device: str) -> str:
        return device

    def barrier(self) -> None:
        pass

    def agree(self, what: str, text: str) -> None:
        self.agreed.append((what, text))

    def reduce_step(self, params, fired, scalars, stop):
        self.step += 1
        self.handed.append(SimpleNamespace(params=params, stop=stop, scalars=scalars))
        stop, scalars = self.answer(self.step, stop, scalars)
        return fired, scalars, stop


@pytest.fixture
def no_sync(monkeypatch):
    monkeypatch.setattr(trainer_module, "sync_batch_norms", lambda sae: None)


def test_every_rank_checks_the_same_config(arrays, tmp_path, no_sync):
    cfg = _cfg(arrays)
    ranks = Ranks()
    Trainer(cfg, tmp_path / "r", progress=False, dist=ranks)
    text = json.dumps(cfg.to_json(), sort_keys=True)
    assert ranks.agreed == [("configs", text)]
    assert text != json.dumps(cfg.to_json()), "(sorted keys: the text is the same on any rank)"


def test_with_ranks_a_signal_stops_at_the_step_every_rank_agreed_on(arrays, tmp_path,
                                                                    monkeypatch, no_sync,
                                                                    saves):
    """A signal after step 3 goes into step 4's all-reduce; the ranks stop after step 4."""
    _signal_after_step(monkeypatch, 3)
    ranks = Ranks()
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_cfg(arrays), tmp_path / "r", progress=False, dist=ranks) \
            .fit(ArraySource(arrays))
    assert [h.stop for h in ranks.handed] == [False, False, False, True]
    assert info.value.step == 4 and saves == [4]


def test_a_stop_on_another_rank_stops_this_one_too(arrays, tmp_path, no_sync, saves):
    ranks = Ranks(lambda step, stop, scalars: (step == 2, scalars))
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_cfg(arrays), tmp_path / "r", progress=False, dist=ranks) \
            .fit(ArraySource(arrays))
    assert info.value.step == 2 and saves == [2]
    assert str(info.value).startswith("a stop on another rank at step 2;")


def test_the_step_reports_the_ranks_averages_and_hands_over_the_source_models_parameters(
        arrays, tmp_path, no_sync):
    ranks = Ranks(lambda step, stop, scalars: (stop, [s + 1.0 for s in scalars]))
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False, dist=ranks)
    t._set_standardization(ArraySource(arrays))
    batch = next(ArraySource(arrays).batches(4, 0, 0, shard=(0, 2)))
    out = t.train_step(batch, 1, 3)
    (handed,) = ranks.handed
    assert handed.stop is False and t.stopping is False
    source = t.sae.models[out.source]
    assert handed.params == list(t.sae.model_parameters(source))
    local = handed.scalars
    assert out.loss == local[0] + 1 and out.recon == [v + 1 for v in local[1:-2]]
    assert (out.aux, out.l0) == (local[-2] + 1, local[-1] + 1)
    assert t.tokens == 2 * 2 * arrays["m0"].shape[1], "this rank's tokens times the world"


# --- one step ------------------------------------------------------------------------------

def test_the_source_model_comes_from_the_runs_own_generator(arrays, tmp_path):
    cfg = _cfg(arrays, max_steps=8, seed=5)
    t = Trainer(cfg, tmp_path / "r", progress=False)
    torch.manual_seed(1234)  # the global generator does not decide it
    t.fit(ArraySource(arrays))
    g = torch.Generator().manual_seed(5)
    want = [list(arrays)[int(torch.randint(3, (1,), generator=g))] for _ in range(8)]
    assert [r["source"] for r in _rows(tmp_path / "r")] == want


def test_a_step_on_its_own_is_not_a_stop_request(arrays, tmp_path):
    assert Trainer(_cfg(arrays), tmp_path / "r").progress is True, "on by default"
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
    t._set_standardization(ArraySource(arrays))
    t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    assert t.stopping is False


def test_half_precision_batches_train_as_their_float32_values(arrays, tmp_path):
    """A store of float16 rows: the step computes in float32 on the rows' exact values."""
    half = {m: v.half() for m, v in next(ArraySource(arrays).batches(4, 0, 0)).items()}
    losses = []
    for name, batch in (("h", half), ("f", {m: v.float() for m, v in half.items()})):
        t = Trainer(_cfg(arrays), tmp_path / name, progress=False)
        t._set_standardization(ArraySource(arrays))
        losses.append(t.train_step(batch, 1, 3).loss)
    assert losses[0] == losses[1]


def test_with_the_source_rule_only_the_source_model_moves(arrays, tmp_path):
    t = Trainer(_cfg(arrays, decoder_update="source"), tmp_path / "r", progress=False)
    t._set_standardization(ArraySource(arrays))
    before = {m: [p.detach().clone() for p in t.sae.model_parameters(m)] for m in arrays}
    out = t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    moved = {m: any(not torch.equal(a, p) for a, p in zip(before[m],
                                                        t.sae.model_parameters(m)))
             for m in arrays}
    source = list(arrays)[out.source]
    assert moved == {m: m == source for m in arrays}


@pytest.mark.parametrize("clip, calls", [(0.0, 0), (0.5, 1)])
def test_grad_clip_zero_clips_nothing(arrays, tmp_path, monkeypatch, clip, calls):
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, c: clipped.append(c) or real(params, c))
    t = Trainer(_cfg(arrays, grad_clip=clip), tmp_path / "r", progress=False)
    t._set_standardization(ArraySource(arrays))
    t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    assert clipped == [clip] * calls


def test_a_concept_silent_for_exactly_dead_after_tokens_is_dead(arrays, tmp_path, monkeypatch):
    seen = []
    real = trainer_module.step_loss

    def spy(sae, xs, source, cfg, dead):
        seen.append(dead.clone())
        return real(sae, xs, source, cfg, dead)

    monkeypatch.setattr(trainer_module, "step_loss", spy)
    t = Trainer(_cfg(arrays, aux="gao", dead_after_tokens=1000), tmp_path / "r",
                progress=False)
    t._set_standardization(ArraySource(arrays))
    t.since_fired[:3] = 1000
    t.since_fired[3:5] = 999
    t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    assert seen[0].tolist() == [True] * 3 + [False] * 13


def test_counts_of_silent_tokens_stay_exact_past_float32(arrays, tmp_path):
    """ImageNet-scale counts (2^24 + 1 tokens and more) are kept in integers."""
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
    assert t.since_fired.dtype == torch.int64
    t.since_fired += 2**24
    t.since_fired += 1
    assert int(t.since_fired[0]) == 2**24 + 1


def test_the_lr_of_a_frozen_source_row_is_the_first_trained_models(arrays, tmp_path):
    t = Trainer(_cfg(arrays, frozen_models=["m0"]), tmp_path / "r", progress=False)
    t._set_standardization(ArraySource(arrays))
    out = t.train_step(next(ArraySource(arrays).batches(4, 0, 0)), 1, 3)
    t.optimizers["m1"].param_groups[0]["lr"] = 0.123
    t.optimizers["m2"].param_groups[0]["lr"] = 0.456
    assert t._metrics_row(out._replace(source=0))["lr"] == 0.123


# --- the stream, validation, the folder ------------------------------------------------

def test_the_stream_resumes_mid_epoch_with_the_runs_pairing_and_shard(arrays, tmp_path,
                                                                       monkeypatch):
    calls = []

    class Recording(ArraySource):
        def batches(self, *a):
            calls.append(a)
            yield from super().batches(*a)

    t = Trainer(_cfg(arrays, shuffle_pairing=True, seed=3), tmp_path / "r", progress=False)
    t.step = 25  # 12 batches an epoch: epoch 2, batch 1
    stream = t._stream(Recording(arrays), 12)
    for _ in range(12):
        next(stream)
    assert calls == [(4, 3, 2, 1, True, (0, 1)), (4, 3, 3, 0, True, (0, 1))]


def test_held_out_r2_is_measured_on_the_first_batches_of_epoch_0(arrays, tmp_path):
    val = ArraySource({m: a[:12] for m, a in arrays.items()})
    t = Trainer(_cfg(arrays, max_steps=4, eval_every=2, eval_batches=1, seed=2),
                tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays), val)
    rows = _rows(tmp_path / "r")
    assert ["val_r2" in r for r in rows] == [False, True, False, True]
    first = next(val.batches(4, 2, 0))
    want = np.round(r2_matrix(t.sae, [first]).r2(), 5)
    assert rows[-1]["val_r2"] == want.tolist()
    assert all(v == round(v, 5) for row in rows[-1]["val_r2"] for v in row)


def test_held_out_r2_of_a_single_image_uses_a_batch_of_one(arrays, tmp_path):
    val = ArraySource({m: a[:1] for m, a in arrays.items()})
    t = Trainer(_cfg(arrays, max_steps=1, eval_every=1), tmp_path / "r", progress=False)
    t.fit(ArraySource(arrays), val)
    got = np.array(_rows(tmp_path / "r")[0]["val_r2"])
    want = np.round(r2_matrix(t.sae, [next(val.batches(1, 0, 0))]).r2(), 5)
    assert got.shape == (3, 3) and np.array_equal(got, want)


def test_held_out_r2_off_measures_nothing_even_with_held_out_data(arrays, tmp_path):
    val = ArraySource({m: a[:8] for m, a in arrays.items()})
    Trainer(_cfg(arrays, max_steps=2, eval_every=0), tmp_path / "r", progress=False) \
        .fit(ArraySource(arrays), val)
    assert all("val_r2" not in r for r in _rows(tmp_path / "r"))


def test_a_rank_other_than_0_trains_without_writing_metrics(arrays, tmp_path, no_sync):
    other = Ranks()
    other.rank, other.is_main = 1, False
    t = Trainer(_cfg(arrays, max_steps=2), tmp_path / "r", progress=True, dist=other)
    t.fit(ArraySource(arrays))
    assert t.step == 2 and not (tmp_path / "r").exists()


def test_the_bar_is_off_without_progress_and_for_a_finished_run(arrays, tmp_path,
                                                                  progress_bars):
    bars = progress_bars(trainer_module)
    Trainer(_cfg(arrays, max_steps=2), tmp_path / "r", progress=False).fit(ArraySource(arrays))
    Trainer(_cfg(arrays, max_steps=2), tmp_path / "r", progress=True) \
        .fit(ArraySource(arrays), resume=True)
    assert [b.kw["disable"] for b in bars] == [True, True]


def test_a_folder_holding_a_run_is_replaced_only_with_force(arrays, tmp_path):
    cfg = _cfg(arrays, max_steps=1)
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    with pytest.raises(Exception, match="holds a run"):
        Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays), force=True)
    assert _rows(tmp_path / "r")[0]["step"] == 1 and len(_rows(tmp_path / "r")) == 1


def test_resuming_a_finished_run_whose_config_was_lost_writes_it_once(arrays, tmp_path, saves):
    """The checkpoint of the last step landed, its config.json did not: the resumed run
    trains nothing and writes its final state."""
    cfg = _cfg(arrays, max_steps=1)
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    (tmp_path / "r" / "config.json").unlink()
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays), resume=True)
    assert saves == [1, 1]
    status = json.loads((tmp_path / "r" / "config.json").read_text())["status"]
    assert status == {"state": "final", "step": 1, "total_steps": 1}


def test_the_sinks_get_the_runs_config(arrays, tmp_path, monkeypatch):
    made = []

    class Sinks:
        def __init__(self, *args):
            made.append(args)

        def log(self, row):
            pass

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "MetricSinks", Sinks)
    cfg = _cfg(arrays, max_steps=1)
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    assert made == [(tmp_path / "r", False, False, cfg.to_json())]


def test_freed_memory_is_kept_on_the_runs_device_type(arrays, tmp_path, monkeypatch):
    kept = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", kept.append)
    Trainer(_cfg(arrays, keep_freed_memory=True), tmp_path / "r", progress=False)
    Trainer(_cfg(arrays, keep_freed_memory=False), tmp_path / "r", progress=False)
    assert kept == ["cpu"]


def test_an_untrained_trainer_sums_up_to_zero(arrays, tmp_path):
    t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
    assert t.summary() == {"run": str(tmp_path / "r"), "steps": 0, "total_steps": 0,
                           "tokens": 0, "elapsed_s": 0.0, "tokens_per_s": 0, "loss": None,
                           "recon": None, "val_r2": None}


@pytest.mark.parametrize("user_set, want", [(False, 1), (True, 2)])
def test_a_resume_takes_the_runs_thread_count_unless_the_user_chose_one(
        arrays, tmp_path, monkeypatch, user_set, want):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        t = Trainer(_cfg(arrays), tmp_path / "r", progress=False)
        (tmp_path / "r").mkdir()
        t.save_checkpoint()
        torch.set_num_threads(2)
        monkeypatch.setattr(trainer_module.threads, "user_set", lambda: user_set)
        Trainer(_cfg(arrays), tmp_path / "r", progress=False).load_checkpoint()
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_extend_starts_from_the_frozen_models_given_weights(arrays, tmp_path):
    cfg = _cfg(arrays, frozen_models=["m0"])
    given = UniversalSAE(_cfg(arrays, seed=9).sae).state_dict()
    t = Trainer(cfg, tmp_path / "r", progress=False, initial_state=given)
    t._set_standardization(ArraySource(arrays))
    for k, v in t.sae.state_dict().items():
        if k.split(".")[0] in ("encoders", "dictionaries") and k.split(".")[1] == "m0":
            assert torch.equal(v, given[k]), k
    partial = {k: v for k, v in given.items() if ".m0." not in k}
    t = Trainer(cfg, tmp_path / "r", progress=False, initial_state=partial)
    with exactly("internal: the frozen models' weights were not all given"):
        t._set_standardization(ArraySource(arrays))
