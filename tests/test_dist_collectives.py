"""usae.distributed's arithmetic, rank by rank, in one process.

Each rank is a thread; ``torch.distributed``'s collectives are replaced by a world that meets
the threads at a barrier and reduces their tensors (sum, min, max, gather). The oracle for
every reduction is one process holding the whole batch: the concatenation of the ranks'
slices. (tests/sae/test_distributed.py runs the real thing under torchrun, more slowly.)"""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from usae import distributed
from usae.distributed import (
    DEFAULT_TIMEOUT_S,
    Dist,
    GlobalBatchNorm1d,
    is_main_process,
    kth_largest_over_ranks,
    peer_lost,
    shard_range,
    sync_batch_norms,
)
from usae.errors import UsaeError


class World:
    """``world`` threads that meet at every collective, as ranks meet in a process group."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.local = threading.local()
        self.slots: list = [None] * world
        self.calls: list[str] = []

    def rank(self) -> int:
        return self.local.rank

    def all_reduce(self, t, op=tdist.ReduceOp.SUM):
        self.slots[self.rank()] = t.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        if op == tdist.ReduceOp.MIN:
            result = stacked.min(0).values
        elif op == tdist.ReduceOp.MAX:
            result = stacked.max(0).values
        else:
            result = stacked.sum(0)
        self.barrier.wait()
        if self.rank() == 0:
            self.calls.append(f"all_reduce:{op}")
        t.copy_(result)

    def all_gather(self, out, t):
        self.slots[self.rank()] = t.clone()
        self.barrier.wait()
        for i, slot in enumerate(self.slots):
            out[i].copy_(slot)
        self.barrier.wait()

    def run(self, fn):
        """``fn(rank)`` on every rank at once; their results in rank order."""
        results: list = [None] * self.world
        errors: list = []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def world(monkeypatch):
    made = {}

    def make(n: int) -> World:
        w = World(n)
        monkeypatch.setattr(tdist, "is_initialized", lambda: True)
        monkeypatch.setattr(tdist, "get_world_size", lambda: n)
        monkeypatch.setattr(tdist, "get_rank", w.rank)
        monkeypatch.setattr(tdist, "all_reduce", w.all_reduce)
        monkeypatch.setattr(tdist, "all_gather", w.all_gather)
        made["world"] = w
        return w

    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    return make


# ---- one process ------------------------------------------------------------------------
def test_one_process_is_rank_0_of_1_and_every_collective_is_a_no_op(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: pytest.fail("collective"))
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: pytest.fail("collective"))
    d = Dist.from_env("cuda")
    assert d == Dist() and not d.enabled and d.is_main
    t = torch.tensor([1.0, 2.0])
    assert d.all_sum_(t) is t and t.tolist() == [1.0, 2.0]
    d.barrier()
    d.agree("configs", "anything")
    assert d.device("cuda") == "cuda" and d.device("cpu") == "cpu"
    d.close()  # owns nothing: nothing to end


def test_rank_properties():
    assert Dist(rank=0, world=2).is_main and Dist(rank=0, world=2).enabled
    assert not Dist(rank=1, world=2).is_main
    assert not Dist(rank=0, world=1).enabled
    assert Dist(rank=1, world=4, local_rank=3).device("cuda") == "cuda:3"
    assert Dist(rank=1, world=4, local_rank=3).device("cuda:0") == "cuda:0"  # chosen: kept
    assert Dist(rank=1, world=4, local_rank=3).device("cpu") == "cpu"


@pytest.mark.parametrize("rank, main", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_is_main_process_reads_rank(monkeypatch, rank, main):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert is_main_process() is main


@pytest.mark.parametrize("n, world", [(10, 3), (7, 7), (5, 8), (1000, 6), (0, 2)])
def test_shard_ranges_tile_the_items_in_order_and_differ_by_at_most_one(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


# ---- joining a job ----------------------------------------------------------------------
@pytest.fixture
def joined(monkeypatch):
    """from_env's calls into torch.distributed, recorded."""
    seen: dict = {"init": [], "cuda": []}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    state = {"initialized": False}

    def init(backend, timeout):
        seen["init"].append((backend, timeout))
        state["initialized"] = True
        state["backend"] = backend

    monkeypatch.setattr(tdist, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(tdist, "init_process_group", init)
    monkeypatch.setattr(tdist, "get_backend", lambda: state["backend"])
    monkeypatch.setattr(torch.cuda, "set_device", seen["cuda"].append)
    seen["state"] = state
    return seen


def test_without_world_size_it_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    assert Dist.from_env() == Dist()


def test_a_world_of_two_is_joined(joined, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert Dist.from_env().world == 2 and len(joined["init"]) == 1


def test_joining_is_logged_for_verbose_runs(joined, caplog):
    with caplog.at_level("DEBUG", logger="usae.distributed"):
        Dist.from_env("cpu")
    assert caplog.messages == ["rank 2 of 4 joined (gloo, timeout 1800 s)"]


def test_from_env_joins_with_gloo_on_cpu_and_a_timeout(joined):
    d = Dist.from_env("cpu")
    assert (d.rank, d.world, d.local_rank, d.backend, d.owns_group) == (2, 4, 1, "gloo", True)
    assert joined["init"] == [("gloo", datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))]
    assert DEFAULT_TIMEOUT_S == 1800.0 and joined["cuda"] == []


def test_from_env_takes_nccl_on_cuda_and_sets_the_local_gpu(joined, monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    d = Dist.from_env("cuda:0")
    assert d.backend == "nccl" and joined["cuda"] == [1]
    assert joined["init"] == [("nccl", datetime.timedelta(seconds=12.5))]


def test_the_backend_variable_overrides_the_device(joined, monkeypatch):
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert Dist.from_env("cuda").backend == "gloo" and joined["cuda"] == []


def test_a_group_made_by_the_caller_is_joined_not_made(joined, monkeypatch):
    joined["state"].update(initialized=True, backend="gloo")
    monkeypatch.delenv("LOCAL_RANK")
    d = Dist.from_env("cuda")
    assert joined["init"] == [] and not d.owns_group and d.local_rank == 0
    destroyed = []
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: destroyed.append(1))
    d.close()
    assert destroyed == []  # not ours to end


def test_close_ends_only_a_healthy_group_it_made(monkeypatch):
    destroyed = []
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: destroyed.append(1))
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    Dist(rank=0, world=2, owns_group=True).close()
    assert destroyed == [1]
    monkeypatch.setattr(distributed, "_PEER_LOST", True)
    Dist(rank=0, world=2, owns_group=True).close()  # a lost peer: gloo can abort in teardown
    assert destroyed == [1]
    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    Dist(rank=0, world=2, owns_group=True).close()  # already ended
    assert destroyed == [1]


# ---- reductions -------------------------------------------------------------------------
def test_reduce_step_averages_grads_ors_masks_averages_scalars_ors_stop(world):
    w = world(3)
    torch.manual_seed(0)
    grads = [[torch.randn(2, 3), torch.randn(4)] for _ in range(3)]
    fired = [torch.tensor([True, False, False, False]), torch.tensor([False, False, True, False]),
             torch.tensor([True, False, False, False])]
    scalars = [[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]]
    stops = [False, True, False]

    def step(rank):
        params = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)),
                  nn.Parameter(torch.zeros(5))]  # the third did not step: no gradient
        params[0].grad, params[1].grad = grads[rank][0].clone(), grads[rank][1].clone()
        out = Dist(rank=rank, world=3).reduce_step(params, fired[rank], scalars[rank],
                                                   stops[rank])
        return params, out

    results = w.run(step)
    mean0 = sum(g[0] for g in grads) / 3
    mean1 = sum(g[1] for g in grads) / 3
    for params, (fired_c, logged, stop) in results:
        torch.testing.assert_close(params[0].grad, mean0)
        torch.testing.assert_close(params[1].grad, mean1)
        assert params[2].grad is None
        assert fired_c.tolist() == [True, False, True, False] and fired_c.dtype == torch.bool
        assert logged == pytest.approx([3.0, 30.0]) and stop is True
    assert w.calls == [f"all_reduce:{tdist.ReduceOp.SUM}"]  # one collective per step


def test_reduce_step_with_no_stop_and_a_bfloat16_grad(world):
    w = world(2)

    def step(rank):
        p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
        p.grad = torch.full((3,), float(rank + 1), dtype=torch.bfloat16)
        fired, logged, stop = Dist(rank=rank, world=2).reduce_step(
            [p], torch.zeros(2, dtype=torch.bool), [float(rank)], False)
        return p.grad, fired, logged, stop

    for grad, fired, logged, stop in w.run(step):
        assert grad.dtype == torch.bfloat16 and grad.tolist() == [1.5, 1.5, 1.5]
        assert fired.tolist() == [False, False] and logged == [0.5] and stop is False


def test_the_stop_flag_is_not_read_from_a_scalar(world):
    w = world(2)

    def step(rank):
        return Dist(rank=rank, world=2).reduce_step([], torch.zeros(1, dtype=torch.bool),
                                                    [1.0, 2.0, 3.0], False)

    for _, logged, stop in w.run(step):
        assert logged == [1.0, 2.0, 3.0] and stop is False


def test_agree_passes_equal_texts_and_fails_every_rank_on_a_difference(world):
    w = world(3)
    assert w.run(lambda r: Dist(rank=r, world=3).agree("configs", "same")) == [None] * 3
    errors = []

    def differ(rank):
        try:
            Dist(rank=rank, world=3).agree("configs", "odd" if rank == 2 else "same")
        except UsaeError as err:
            errors.append(str(err))

    w.run(differ)
    assert errors == ["the ranks were started with different configs; start every rank with "
                      "the same command"] * 3


def test_all_sum_takes_the_operation_asked(world):
    w = world(2)
    out = w.run(lambda r: Dist(rank=r, world=2).all_sum_(torch.tensor([float(r), 5.0 - r]),
                                                          tdist.ReduceOp.MAX).tolist())
    assert out == [[1.0, 5.0], [1.0, 5.0]]
    out = w.run(lambda r: Dist(rank=r, world=2).all_sum_(torch.tensor([float(r)])).tolist())
    assert out == [[1.0], [1.0]]


def test_barrier_meets_the_peers(monkeypatch):
    met = []
    monkeypatch.setattr(tdist, "barrier", lambda: met.append(1))
    Dist(rank=0, world=2).barrier()
    assert met == [1]


def test_a_failed_collective_names_the_rank_and_says_resume(monkeypatch):
    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    monkeypatch.setattr(tdist, "get_rank", lambda: 3)

    def broken(*args, **kwargs):
        raise RuntimeError("[gloo] Connection closed by peer 10.0.0.2\nstack trace...")

    monkeypatch.setattr(tdist, "all_reduce", broken)
    with pytest.raises(UsaeError) as info:
        Dist(rank=3, world=4).all_sum_(torch.zeros(2))
    assert str(info.value) == ("rank 3: a peer process died or stopped answering ([gloo] "
                               "Connection closed by peer 10.0.0.2) — restart the job with "
                               "--resume")
    assert peer_lost()
    monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("")))
    with pytest.raises(UsaeError, match=r"answering \(RuntimeError\) — restart"):
        Dist(rank=3, world=4).all_sum_(torch.zeros(2))
    monkeypatch.setattr(tdist, "barrier", lambda: (_ for _ in ()).throw(
        RuntimeError("x" * 300)))
    with pytest.raises(UsaeError) as info:
        Dist(rank=3, world=4).barrier()
    assert f"({'x' * 200})" in str(info.value)


def test_other_errors_of_a_collective_are_not_peer_losses(monkeypatch):
    monkeypatch.setattr(distributed, "_PEER_LOST", False)
    monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(
        TypeError("bad tensor")))
    with pytest.raises(TypeError):
        Dist(rank=0, world=2).all_sum_(torch.zeros(1))
    assert not peer_lost()


# ---- BatchNorm over the global batch ----------------------------------------------------
def test_global_batch_norm_equals_batch_norm_over_the_whole_batch(world):
    w = world(2)
    torch.manual_seed(1)
    x = torch.randn(12, 5) * 3 + 1
    slices = x.chunk(2)
    whole = nn.BatchNorm1d(5, momentum=0.3)
    nn.init.uniform_(whole.weight)
    nn.init.uniform_(whole.bias)
    x_whole = x.clone().requires_grad_(True)
    whole(x_whole).pow(3).sum().backward()

    def rank_step(rank):
        bn = nn.BatchNorm1d(5, momentum=0.3)
        bn.load_state_dict(whole.state_dict())  # (after one step; reset below)
        bn.reset_running_stats()
        with torch.no_grad():
            bn.weight.copy_(whole.weight)
            bn.bias.copy_(whole.bias)
        sync_batch_norms(bn)
        xr = slices[rank].clone().requires_grad_(True)
        y = bn(xr)
        y.pow(3).sum().backward()
        return bn, xr.grad, y.detach()

    whole_y = nn.functional.batch_norm(x, None, None, whole.weight, whole.bias, training=True)
    results = w.run(rank_step)
    for rank, (bn, grad, y) in enumerate(results):
        assert type(bn) is GlobalBatchNorm1d
        torch.testing.assert_close(y, whole_y.chunk(2)[rank].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, x_whole.grad.chunk(2)[rank], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bn.running_mean, whole.running_mean)
        torch.testing.assert_close(bn.running_var, whole.running_var)  # unbiased, n = 12
        assert int(bn.num_batches_tracked) == 1
    # each rank's weight gradient is its slice's share: summed (as reduce_step does), the whole's
    torch.testing.assert_close(sum(bn.weight.grad for bn, _, _ in results),
                               whole.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [3.0, 0.002])  # a spread far above eps, and one near it
def test_running_statistics_follow_the_momentum_over_steps(world, scale):
    w = world(2)
    torch.manual_seed(2)
    steps = [torch.randn(2, 3) * scale + 1 for _ in range(3)]  # one token per rank: n = 2
    whole = nn.BatchNorm1d(3, momentum=0.3)
    whole_out = [whole(x) for x in steps]

    def rank_steps(rank):
        bn = GlobalBatchNorm1d(3, momentum=0.3)
        return bn, [bn(x[rank:rank + 1]).detach() for x in steps]

    for rank, (bn, outs) in enumerate(w.run(rank_steps)):
        torch.testing.assert_close(bn.running_mean, whole.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var, whole.running_var, rtol=1e-5, atol=1e-9)
        for got, want in zip(outs, whole_out):  # (near eps, eps itself counts)
            torch.testing.assert_close(got, want[rank:rank + 1].detach(), rtol=1e-4, atol=1e-5)


def test_global_batch_norm_momentum_none_and_no_running_stats(world):
    w = world(2)
    x = torch.arange(16, dtype=torch.float32).reshape(8, 2)

    def rank_step(rank):
        cumulative = GlobalBatchNorm1d(2, momentum=None)
        stateless = GlobalBatchNorm1d(2, track_running_stats=False)
        cumulative(x.chunk(2)[rank])
        return cumulative, stateless(x.chunk(2)[rank]).detach()

    ref = nn.BatchNorm1d(2, momentum=0.1)  # momentum None falls back to 0.1 here
    ref(x)
    for rank, (cumulative, y) in enumerate(w.run(rank_step)):
        torch.testing.assert_close(cumulative.running_mean, ref.running_mean)
        torch.testing.assert_close(cumulative.running_var, ref.running_var)
        torch.testing.assert_close(y, nn.functional.batch_norm(
            x, None, None, training=True).chunk(2)[rank], atol=1e-5, rtol=1e-5)


def test_global_batch_norm_in_eval_or_alone_is_batch_norm(monkeypatch):
    bn = GlobalBatchNorm1d(3)
    x = torch.randn(6, 3)
    monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: pytest.fail("collective"))
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 1)
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, None, None, training=True))
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    bn.eval()
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, training=False))


def test_sync_batch_norms_converts_only_plain_batch_norm_1d_in_place():
    class Custom(nn.BatchNorm1d):
        pass

    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)),
                        nn.BatchNorm2d(3), Custom(3))
    weight = net[1].weight
    sync_batch_norms(net)
    assert [type(m).__name__ for m in net.modules()][1:] == [
        "Linear", "GlobalBatchNorm1d", "Sequential", "GlobalBatchNorm1d", "BatchNorm2d",
        "Custom"]
    assert net[1].weight is weight  # the same parameter object: optimizers still hold it


# ---- the k-th largest over ranks (BatchTopK) --------------------------------------------
@pytest.mark.parametrize("sizes, kths", [((6, 6), (3, 2)), ((4, 9, 2), (1, 5, 2)),
                                         ((3, 3), (3, 3)), ((2, 5), (4, 1))])
def test_kth_largest_over_ranks_is_the_whole_batchs(world, sizes, kths):
    w = world(len(sizes))
    gen = torch.Generator().manual_seed(sum(sizes))
    flats = [torch.randn(n, generator=gen) for n in sizes]
    whole = torch.cat(flats).sort(descending=True).values[sum(kths) - 1]
    got = w.run(lambda r: kth_largest_over_ranks(flats[r], kths[r]))
    assert all(float(g) == float(whole) for g in got)
    assert all(g.dim() == 0 for g in got)


def test_kth_largest_in_one_process_is_the_local_one(monkeypatch):
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    flat = torch.tensor([0.5, 3.0, -1.0, 2.0])
    assert float(kth_largest_over_ranks(flat, 2)) == 2.0
    assert float(kth_largest_over_ranks(flat, 9)) == -1.0  # more than there are: the least
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 1)
    assert float(kth_largest_over_ranks(flat, 1)) == 3.0
