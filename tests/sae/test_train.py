import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from usae.config import resolve, with_train
from usae.data.sources import ArraySource
from usae.errors import UsaeError
from usae.sae.trainer import Trainer, lr_at
from usae.store.writer import store_from_arrays


def small_cfg(arrays, **over):
    models = tuple(arrays)
    dims = tuple(a.shape[2] for a in arrays.values())
    base = {"n_concepts": 32, "k": 3, "batch_images": 4, "max_steps": 12, "log_every": 1,
            "checkpoint_every": 4}
    base.update(over)
    return resolve(models, dims, "paper", base)


def losses_of(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_paper_step_changes_only_the_source_model(arrays, tmp_path):
    cfg = small_cfg(arrays, lr=1e-2, warmup_steps=1)
    tr = Trainer(cfg, tmp_path, progress=False)
    src = ArraySource(arrays)
    tr._set_standardization(src)
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    batch = next(src.batches(4, 0, 0))
    out = tr.train_step(batch, warmup=1, total=10)
    chosen = tr.sae.models[out.source]
    after = tr.sae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    for key in changed:
        assert f".{chosen}." in key or key.endswith(f".{chosen}") or \
            key == f"dictionaries.{chosen}", key
    # encoder i's BatchNorm statistics moved; nobody else's did
    assert f"encoders.{chosen}.norm.running_mean" in changed
    assert f"dictionaries.{chosen}" in changed


def test_decoder_update_all_steps_every_decoder(arrays, tmp_path):
    cfg = small_cfg(arrays, lr=1e-2, warmup_steps=1, decoder_update="all")
    tr = Trainer(cfg, tmp_path, progress=False)
    src = ArraySource(arrays)
    tr._set_standardization(src)
    before = {m: tr.sae.dictionaries[m].detach().clone() for m in tr.sae.models}
    out = tr.train_step(next(src.batches(4, 0, 0)), warmup=1, total=10)
    for m in tr.sae.models:
        assert not torch.equal(before[m], tr.sae.dictionaries[m].detach())
    others = [m for i, m in enumerate(tr.sae.models) if i != out.source]
    assert all(p.grad is None for m in others for p in tr.sae.encoders[m].parameters())


def test_per_model_schedules_step_only_on_selection(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=30)
    tr = Trainer(cfg, tmp_path, progress=False)
    tr.fit(ArraySource(arrays))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counts = {m: 0 for m in arrays}
    per_epoch = 48 // 4
    for row in rows:
        assert row["sched_t"] == counts[row["source"]]
        assert row["lr"] == pytest.approx(lr_at(counts[row["source"]], per_epoch, 30, 3e-4, 1e-6))
        counts[row["source"]] += 1
    assert sum(tr.sched_counts) == 30 and tr.sched_counts == [counts[m] for m in arrays]
    # the per-model cosine never reaches its floor (documented behaviour)
    assert min(r["lr"] for r in rows[per_epoch:]) > 1e-6 + 1e-9


def test_global_schedule_follows_the_iteration(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=20, schedule="global", warmup_steps=5)
    Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, 5, 20, 3e-4, 1e-6))


def test_lr_schedule_shape():
    assert lr_at(0, 10, 100, 1.0, 1e-6) == pytest.approx(1e-6)
    assert lr_at(10, 10, 100, 1.0, 1e-6) == pytest.approx(1.0)
    assert lr_at(100, 10, 100, 1.0, 1e-6) == pytest.approx(1e-6)
    assert lr_at(55, 10, 100, 1.0, 0.0) == pytest.approx(0.5)


def test_a_run_takes_min_steps_when_its_epochs_are_fewer_and_max_steps_always_wins(
        arrays, tmp_path):
    tc = small_cfg(arrays, max_steps=0, epochs=2, min_steps=10).train
    assert tc.total_steps(3) == 10  # 2 epochs of 3 batches: 6 steps, raised to 10
    assert tc.total_steps(7) == 14  # 2 epochs of 7 batches: more than 10
    assert with_train(small_cfg(arrays), max_steps=5, min_steps=10).train.total_steps(3) == 5
    # the fixture's 48 images, 4 a batch: an epoch is 12 steps
    cfg = small_cfg(arrays, max_steps=0, epochs=1, min_steps=17, log_every=1,
                    checkpoint_every=100)
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps[-1] == 17 and len(steps) == 17  # the data repeats past its epoch


def test_same_seed_same_losses_and_metrics_contract(arrays, tmp_path):
    cfg = small_cfg(arrays)
    Trainer(cfg, tmp_path / "a", progress=False).fit(ArraySource(arrays))
    Trainer(cfg, tmp_path / "b", progress=False).fit(ArraySource(arrays))
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "tokens", "elapsed_s"} <= set(row)
    assert row["step"] == 12 and row["tokens"] == 12 * 4 * 4
    assert (tmp_path / "a" / "config.json").exists()
    assert (tmp_path / "a" / "model.safetensors").exists()
    other = with_train(cfg, seed=1)
    Trainer(other, tmp_path / "c", progress=False).fit(ArraySource(arrays))
    assert losses_of(tmp_path / "c") != losses_of(tmp_path / "a")


def test_resume_in_process_equals_uninterrupted(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=14, checkpoint_every=5)
    Trainer(cfg, tmp_path / "full", progress=False).fit(ArraySource(arrays))
    # interrupted at step 10 (the last checkpoint), metrics written up to 12
    part = with_train(cfg, max_steps=14)
    tr = Trainer(part, tmp_path / "part", progress=False)
    src = ArraySource(arrays)
    stopper = _StopAfter(src, 12)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(stopper)
    Trainer(part, tmp_path / "part", progress=False).fit(ArraySource(arrays), resume=True)
    assert losses_of(tmp_path / "part") == losses_of(tmp_path / "full")


class _StopAfter(ArraySource):
    """An ArraySource that raises KeyboardInterrupt when asked for batch number ``stop``."""

    def __init__(self, src, stop):
        self.__dict__.update(src.__dict__)
        self.stop, self.served = stop, 0

    def batches(self, *args, **kw):
        for b in super().batches(*args, **kw):
            if self.served == self.stop:
                raise KeyboardInterrupt
            self.served += 1
            yield b


def test_resume_refuses_a_different_config(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=4)
    Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays))
    with pytest.raises(UsaeError, match="different config.*lr"):
        Trainer(with_train(cfg, lr=1e-2), tmp_path, progress=False).fit(
            ArraySource(arrays), resume=True)
    with pytest.raises(UsaeError, match="no checkpoint"):
        Trainer(cfg, tmp_path / "empty", progress=False).fit(ArraySource(arrays), resume=True)


def test_nan_batch_is_caught_before_the_weights(arrays, tmp_path):
    bad = {m: a.copy() for m, a in arrays.items()}
    cfg = small_cfg(arrays)
    tr = Trainer(cfg, tmp_path, progress=False)
    src = ArraySource(arrays)
    tr._set_standardization(src)
    batch = next(src.batches(4, 0, 0))
    batch["m1"][3, 2] = float("nan")
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    with pytest.raises(UsaeError, match="m1.*non-finite"):
        tr.train_step(batch, 1, 10)
    assert all(torch.equal(before[k], v) for k, v in tr.sae.state_dict().items())
    bad["m0"][0, 0, 0] = np.inf
    with pytest.raises(UsaeError, match="m0.*NaN or Inf"):
        ArraySource(bad)


def test_data_mismatches_fail_clearly(arrays, tmp_path):
    cfg = small_cfg(arrays)
    wrong = dict(arrays)
    wrong["m2"] = arrays["m2"][:, :, :5]
    with pytest.raises(UsaeError, match="m2.*d=5"):
        Trainer(cfg, tmp_path, progress=False).fit(ArraySource(wrong))
    with pytest.raises(UsaeError, match="differs"):
        ArraySource({"a": np.zeros((4, 2, 3)), "b": np.zeros((5, 2, 3))})
    tiny = {m: a[:2] for m, a in arrays.items()}
    with pytest.raises(UsaeError, match="fewer than one batch"):
        Trainer(cfg, tmp_path / "t", progress=False).fit(ArraySource(tiny))


def test_training_reduces_the_loss(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=300, lr=1e-2, log_every=10, checkpoint_every=400,
                    warmup_steps=5)
    Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays))
    losses = losses_of(tmp_path)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_cli_train_killed_mid_run_resumes_to_the_same_losses(arrays, tmp_path):
    store = tmp_path / "store"
    store_from_arrays(store, arrays, dtype="float32")
    common = ["--store", str(store), "--set", "n_concepts=32", "--set", "k=3",
              "--set", "batch_images=2", "--set", "log_every=1", "--set", "checkpoint_every=3",
              "--max-steps", "600", "--no-progress"]
    usae = [sys.executable, "-m", "usae.cli", "train"]
    full = tmp_path / "full"
    subprocess.run(usae + common + ["--out", str(full)], check=True, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(usae + common + ["--out", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # (a loaded machine takes long to import torch)
    while time.time() < deadline and proc.poll() is None:
        ck = part / "metrics.jsonl"
        if ck.exists() and len(ck.read_text().splitlines()) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len((part / "metrics.jsonl").read_text().splitlines())
    assert 20 <= n_before < 600, "the kill should land mid-run"
    res = subprocess.run(usae + common + ["--out", str(part), "--resume"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert losses_of(part) == losses_of(full)
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 601))


def test_held_out_r2_matrix_is_logged(arrays, tmp_path):
    src = ArraySource(arrays)
    train, val = src.subset(np.arange(40)), src.subset(np.arange(40, 48))
    cfg = small_cfg(arrays, max_steps=8, eval_every=4, eval_batches=2, log_every=4)
    trainer = Trainer(cfg, tmp_path, progress=False)
    sae = trainer.fit(train, val)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_r2" in r] == [4, 8]
    # the logged matrix is the held-out R2 of the first eval_batches val batches, recomputed
    from usae.analysis.metrics import r2_matrix

    batches = list(val.batches(4, cfg.train.seed, 0))[:2]
    want = r2_matrix(sae, batches).r2()
    np.testing.assert_allclose(rows[-1]["val_r2"], want, atol=1e-4)
    assert trainer.summary()["val_r2"] == rows[-1]["val_r2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu_closely(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=6)
    Trainer(cfg, tmp_path / "cpu", progress=False).fit(ArraySource(arrays))
    Trainer(with_train(cfg, device="cuda"), tmp_path / "gpu", progress=False).fit(
        ArraySource(arrays))
    np.testing.assert_allclose(losses_of(tmp_path / "gpu"), losses_of(tmp_path / "cpu"),
                               rtol=1e-3)


def test_cuda_requested_without_cuda_fails_clearly(arrays, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsaeError, match="CUDA is not available"):
        Trainer(small_cfg(arrays, device="cuda"), tmp_path, progress=False)


def test_corrupt_checkpoint_fails_clearly_on_resume(arrays, tmp_path):
    cfg = small_cfg(arrays, max_steps=4)
    Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays))
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UsaeError, match="corrupt"):
        Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays), resume=True)


def test_keep_freed_memory_is_a_safe_process_setting():
    from usae.malloc import default_malloc, keep_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert keep_freed_memory("cuda:0") is False  # a GPU's memory is not glibc's
    assert keep_freed_memory() is True
    x = torch.randn(4096, 4096)  # a large block now comes from the heap, and works
    assert float(x.sum().isfinite())
    assert default_malloc() is True



def test_grad_clip_bounds_each_stepped_models_update(arrays, tmp_path):
    """Guards gradient clipping: with a tiny clip and SGD-like Adam disabled (lr tiny), the
    clipped gradient norm of the source model must equal the clip."""
    cfg = small_cfg(arrays, max_steps=1, grad_clip=1e-3, log_every=1)
    trainer = Trainer(cfg, tmp_path / "a", progress=False)
    seen = {}
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        total = real(params, max_norm, *a, **kw)
        seen["before"], seen["max"] = float(total), max_norm
        seen["after"] = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        trainer.fit(ArraySource(arrays))
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    assert seen["max"] == 1e-3 and seen["before"] > 1e-3
    assert seen["after"] == pytest.approx(1e-3, rel=1e-4)


def test_weight_decay_and_clip_change_the_result(arrays, tmp_path):
    """Guards that weight_decay and grad_clip reach the optimizer step (disabling either must
    change the weights)."""
    from usae.files import load_safetensors

    def weights(name, **over):
        Trainer(small_cfg(arrays, max_steps=6, **over), tmp_path / name,
                progress=False).fit(ArraySource(arrays))
        return load_safetensors(tmp_path / name / "model.safetensors")

    base = weights("base", weight_decay=0.5, grad_clip=0.01)
    for name, over in (("wd", {"weight_decay": 0.0, "grad_clip": 0.01}),
                       ("clip", {"weight_decay": 0.5, "grad_clip": 0.0})):
        other = weights(name, **over)
        assert any(not torch.equal(base[k], other[k]) for k in base), name


def test_decoder_update_all_advances_only_the_source_models_schedule(arrays, tmp_path):
    """Guards the per-model schedule counter with decoder_update=all: it follows the sampled
    source model only (advancing it for every stepped model must fail)."""
    cfg = small_cfg(arrays, max_steps=9, decoder_update="all", log_every=1)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit(ArraySource(arrays))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counts = {m: sum(r["source"] == m for r in rows) for m in arrays}
    assert trainer.sched_counts == [counts[m] for m in arrays]
    assert sum(trainer.sched_counts) == 9


def test_aux_gao_tracks_dead_concepts_and_resume_restores_them(arrays, tmp_path):
    """Guards dead-concept tracking inside the Trainer and its restoration on resume."""
    cfg = small_cfg(arrays, max_steps=8, aux="gao", dead_after_tokens=16, checkpoint_every=4,
                    n_concepts=64)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit(ArraySource(arrays))
    part = Trainer(with_train(cfg, max_steps=8), tmp_path / "part", progress=False)
    part.total = 8
    from usae.sae.run import prepare_folder

    prepare_folder(part.out, resume=False, force=False)
    part._set_standardization(ArraySource(arrays))
    stream = part._stream(ArraySource(arrays), 12)
    for _ in range(4):
        part.train_step(next(stream), 12, 8)
    part.save_checkpoint()
    # since_fired counts tokens since each concept last fired: 4 steps x 16 tokens max
    assert int(part.since_fired.max()) <= 4 * 16 and int(part.since_fired.min()) == 0
    resumed = Trainer(cfg, tmp_path / "part", progress=False)
    resumed.load_checkpoint()
    assert torch.equal(resumed.since_fired, part.since_fired)
    resumed.fit(ArraySource(arrays), resume=True)
    assert torch.equal(resumed.since_fired, full.since_fired)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    dead = (full.since_fired >= 16).float().mean().item()
    assert rows[-1]["dead_fraction"] == pytest.approx(dead)
    assert any(r["aux"] > 0 for r in rows)  # AuxK ran once concepts died


def test_tensorboard_and_wandb_sinks_get_every_numeric_scalar(arrays, tmp_path, monkeypatch):
    """Guards the optional loggers' wiring, with stand-ins for the two packages."""
    import types

    logged: dict[str, list] = {"tb": [], "wandb": [], "closed": []}

    class Writer:
        def __init__(self, logdir):
            logged["dir"] = logdir

        def add_scalar(self, k, v, step):
            logged["tb"].append((k, step))

        def close(self):
            logged["closed"].append("tb")

    class Run:
        def log(self, scalars, step):
            logged["wandb"].append((sorted(scalars), step))

        def finish(self):
            logged["closed"].append("wandb")

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    wb = types.ModuleType("wandb")
    wb.init = lambda **kw: logged.setdefault("init", kw) and Run() or Run()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = small_cfg(arrays, max_steps=4, log_every=2, tensorboard=True, wandb=True)
    Trainer(cfg, tmp_path, progress=False).fit(ArraySource(arrays))
    assert logged["dir"] == str(tmp_path / "tb")
    assert ("loss", 2) in logged["tb"] and ("loss", 4) in logged["tb"]
    assert [s for _, s in logged["wandb"]] == [2, 4]
    assert "source" not in logged["wandb"][0][0] and "loss" in logged["wandb"][0][0]
    assert logged["init"]["mode"] == "offline"
    assert sorted(logged["closed"]) == ["tb", "wandb"]


def test_encoder_init_transpose_starts_each_encoder_as_its_dictionary(arrays, tmp_path):
    """Guards encoder_init=transpose: weight rows = the unit-row dictionary, bias 0; the
    default keeps PyTorch's Linear init (the paper's)."""
    tr = Trainer(small_cfg(arrays, encoder_init="transpose"), tmp_path / "t", progress=False)
    for m in tr.sae.models:
        d = tr.sae.dictionaries[m].detach()
        want = d / (d.norm(dim=1, keepdim=True) + 1e-8)
        torch.testing.assert_close(tr.sae.encoders[m].linear.weight.detach(), want)
        assert torch.count_nonzero(tr.sae.encoders[m].linear.bias) == 0
    default = Trainer(small_cfg(arrays), tmp_path / "d", progress=False)
    m = default.sae.models[0]
    assert not torch.allclose(default.sae.encoders[m].linear.weight,
                              default.sae.dictionaries[m].detach(), atol=1e-3)
    with pytest.raises(UsaeError, match="encoder_init must be one of"):
        small_cfg(arrays, encoder_init="zeros")


def test_fused_optimizer_is_the_same_adamw_update_and_may_change_on_resume(arrays, tmp_path):
    """Guards `fused_optimizer`: each model's AdamW is fused only when asked (the `fast`
    preset asks, `paper` does not), with the run's lr and weight decay; fused and default give
    the same losses to rounding; and a run may resume with the other implementation."""
    from usae.sae.trainer import make_optimizer

    assert resolve(("a",), (4,), "fast").train.fused_optimizer
    assert not resolve(("a",), (4,), "paper").train.fused_optimizer
    cfg = small_cfg(arrays, max_steps=6, weight_decay=0.5, lr=2e-3, checkpoint_every=3)
    fused_cfg = with_train(cfg, fused_optimizer=True)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], fused_cfg.train)
    assert opt.defaults["fused"] is True and opt.defaults["lr"] == 2e-3
    assert opt.defaults["weight_decay"] == 0.5
    assert not make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.train).defaults["fused"]
    plain = Trainer(cfg, tmp_path / "plain", progress=False)
    assert not any(o.defaults["fused"] for o in plain.optimizers.values())
    plain.fit(ArraySource(arrays))
    tr = Trainer(fused_cfg, tmp_path / "fused", progress=False)
    assert all(o.defaults["fused"] for o in tr.optimizers.values())
    tr.fit(ArraySource(arrays))
    np.testing.assert_allclose(losses_of(tmp_path / "fused"), losses_of(tmp_path / "plain"),
                               rtol=1e-5)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, part, progress=False).fit(_StopAfter(ArraySource(arrays), 4))
    Trainer(fused_cfg, part, progress=False).fit(ArraySource(arrays), resume=True)
    np.testing.assert_allclose(losses_of(part), losses_of(tmp_path / "plain"), rtol=1e-5)


@pytest.mark.parametrize("bad_model", [0, 2])
def test_a_non_finite_batch_names_its_model_and_leaves_the_weights(arrays, tmp_path,
                                                                   bad_model):
    """Guards the batch check (one host sync for every model): the error names the model
    whose activations are not finite, whichever it is, and no weight moved."""
    cfg = small_cfg(arrays)
    tr = Trainer(cfg, tmp_path, progress=False)
    src = ArraySource(arrays)
    tr._set_standardization(src)
    batch = {m: x.clone() for m, x in next(src.batches(4, 0, 0)).items()}
    bad = tr.sae.models[bad_model]
    batch[bad][5, 0] = float("nan")
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    with pytest.raises(UsaeError) as err:
        tr.train_step(batch, warmup=1, total=10)
    assert str(err.value) == (f"model {bad!r}: non-finite activations in the batch at step 1; "
                              "the weights were not touched")
    assert all(torch.equal(v, tr.sae.state_dict()[k]) for k, v in before.items())


def test_a_non_finite_loss_stops_before_the_optimizer_step(arrays, tmp_path, monkeypatch):
    """Guards the loss check, read from the step's host scalars: an infinite loss is a clear
    error naming the step and the source model, and no parameter moved (BatchNorm's running
    statistics, updated by the forward, are not parameters)."""
    import usae.sae.trainer as train_module

    real = train_module.step_loss

    def exploding(*args, **kwargs):
        loss, out, fired = real(*args, **kwargs)
        return loss * float("inf"), out._replace(loss=float("inf")), fired

    monkeypatch.setattr(train_module, "step_loss", exploding)
    cfg = small_cfg(arrays)
    tr = Trainer(cfg, tmp_path, progress=False)
    src = ArraySource(arrays)
    tr._set_standardization(src)
    before = {k: v.detach().clone() for k, v in tr.sae.named_parameters()}
    with pytest.raises(UsaeError) as err:
        tr.train_step(next(src.batches(4, 0, 0)), warmup=1, total=10)
    assert str(err.value).startswith("the loss became inf at step 1 (source model ")
    assert str(err.value).endswith(") — lower lr")
    assert all(torch.equal(v, before[k]) for k, v in tr.sae.named_parameters())


def test_an_independent_run_stopped_between_models_resumes_to_the_same_weights(arrays,
                                                                               tmp_path):
    """`train --independent --resume` reads the first model's checkpoint (its runs live in
    RUN/<model>/), checks the config before any work, and starts the models the stopped run
    never reached."""
    from safetensors.torch import load_file

    from usae.errors import ConfigMismatch
    from usae.sae.training import train_from_store

    store = store_from_arrays(tmp_path / "store", arrays, dtype="float32").path
    sets = ["n_concepts=16", "k=3", "batch_images=8", "checkpoint_every=2"]
    for name in ("whole", "part"):
        train_from_store(store, tmp_path / name, sets=sets, max_steps=6, independent=True,
                         progress=False)
    last = list(arrays)[-1]
    shutil.rmtree(tmp_path / "part" / last)  # stopped before the last model began
    (tmp_path / "part" / "independent.json").unlink()
    kept = (tmp_path / "part" / list(arrays)[0] / "model.safetensors").read_bytes()
    with pytest.raises(ConfigMismatch, match="lr"):
        train_from_store(store, tmp_path / "part", sets=[*sets, "lr=0.1"], max_steps=6,
                         independent=True, progress=False, resume=True)
    assert not (tmp_path / "part" / last).exists(), "refused before any work"
    train_from_store(store, tmp_path / "part", sets=sets, max_steps=6, independent=True,
                     progress=False, resume=True)
    assert (tmp_path / "part" / "independent.json").exists()
    assert (tmp_path / "part" / list(arrays)[0] / "model.safetensors").read_bytes() == kept
    for m in arrays:
        a = load_file(tmp_path / "whole" / m / "model.safetensors")
        b = load_file(tmp_path / "part" / m / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), m
