"""Data parallelism under ``torchrun``: one place for process groups and every reduction.

``torchrun --nproc_per_node N -m usae train|cache ...`` starts N copies of the command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in their environment; ``Dist.from_env`` joins them
(gloo on CPU, NCCL on CUDA, with a timeout so a dead or hung peer is an error, not a hang).
Without those variables ``Dist`` is the single process and every method is a no-op, so the
trainer and the cache call the same methods either way.

What N processes do so that they compute the same step as one process on the global batch:
each rank reads its own slice of whole images (``shard``); BatchNorm statistics are summed
over all ranks (``GlobalBatchNorm1d``); the stepped parameters' gradients, the fired-concept
mask, the logged scalars and the stop request travel in one all-reduce per step
(``reduce_step``); rank 0 alone writes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from usae.errors import UsaeError

log = logging.getLogger(__name__)
TIMEOUT_ENV = "USAE_DIST_TIMEOUT_S"
BACKEND_ENV = "USAE_DIST_BACKEND"  # gloo | nccl: overrides the choice by device
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    owns_group: bool = False  # from_env created the process group, so close() ends it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Dist":
        """Join the torchrun job described by the environment, or the single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = not tdist.is_initialized()
        if owns:
            backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.startswith("cuda")
                                                      else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(local)
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
            tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
            log.debug("rank %d of %d joined (%s, timeout %.0f s)", rank, world, backend, timeout)
        return cls(rank, world, local, tdist.get_backend(), owns)

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) under torchrun; set
        ``CUDA_VISIBLE_DEVICES`` per process to choose otherwise."""
        return f"cuda:{self.local_rank}" if self.enabled and device == "cuda" else device

    # -- collectives (no-ops for one process) -------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            _checked(tdist.barrier)

    def all_sum_(self, t: Tensor, op: Any = tdist.ReduceOp.SUM) -> Tensor:
        """In-place reduction over ranks (NCCL gets a GPU copy of a CPU tensor)."""
        if not self.enabled:
            return t
        if self.backend == "nccl" and not t.is_cuda:
            moved = t.to(f"cuda:{self.local_rank}")
            _checked(tdist.all_reduce, moved, op=op)
            return t.copy_(moved)
        _checked(tdist.all_reduce, t, op=op)
        return t

    def agree(self, what: str, text: str) -> None:
        """Fail on every rank when ranks were given different ``text`` (a config, a list)."""
        if not self.enabled:
            return
        digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int64)
        lo = self.all_sum_(digest.clone(), tdist.ReduceOp.MIN)
        hi = self.all_sum_(digest.clone(), tdist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise UsaeError(f"the ranks were started with different {what}; start every "
                            "rank with the same command")

    def reduce_step(self, params: list[nn.Parameter], fired_c: Tensor, scalars: list[float],
                    stop: bool) -> tuple[Tensor, list[float], bool]:
        """One all-reduce per step: average the gradients of ``params`` (in place), OR the
        fired masks, average the logged scalars and OR the stop requests."""
        if not self.enabled:
            return fired_c, scalars, stop
        grads = [p.grad for p in params if p.grad is not None]
        tail = torch.tensor([*scalars, 1.0 if stop else 0.0], dtype=torch.float32,
                            device=fired_c.device)
        flat = torch.cat([*(g.reshape(-1).float() for g in grads), fired_c.float(), tail])
        self.all_sum_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(self.world)
            offset += g.numel()
        fired = flat[offset:offset + fired_c.numel()] > 0
        tail = flat[offset + fired_c.numel():].cpu()
        return fired, (tail[:-1] / self.world).tolist(), bool(tail[-1] > 0)

    def close(self) -> None:
        """End the process group if ``from_env`` created it (not one the caller made)."""
        if self.owns_group and tdist.is_initialized() and not _PEER_LOST:
            tdist.destroy_process_group()  # (after a lost peer, gloo can abort in teardown)


_PEER_LOST = False  # a collective failed: the group is broken and is not torn down


def peer_lost() -> bool:
    """Whether a collective of this process failed (a peer died or stopped answering)."""
    return _PEER_LOST


def _checked(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run a collective; a dead or silent peer (gloo/NCCL error or timeout) is a UsaeError."""
    global _PEER_LOST
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:  # DistBackendError and gloo's errors are RuntimeErrors
        _PEER_LOST = True
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else type(err).__name__
        raise UsaeError(f"rank {tdist.get_rank()}: a peer process died or stopped answering "
                        f"({first}) — restart the job with --resume") from None


def is_main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0 (for what only one process prints)."""
    return os.environ.get("RANK", "0") == "0"


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous part ``[lo, hi)`` of ``n`` items that ``rank`` of ``world`` takes."""
    return n * rank // world, n * (rank + 1) // world


# -- BatchNorm over the global batch --------------------------------------------------------
class _GlobalSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.clone()
        _checked(tdist.all_reduce, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        _checked(tdist.all_reduce, grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover every rank's slice of the batch (the
    paper normalizes over all the batch's tokens). Same parameters, buffers and state-dict
    keys; in eval mode, or with one process, it is ``BatchNorm1d``. Two-pass: the mean, then
    the variance around it (equal slices on every rank)."""

    def forward(self, x_nc: Tensor) -> Tensor:  # type: ignore[override]
        if not self.training or not tdist.is_initialized() or tdist.get_world_size() == 1:
            return super().forward(x_nc)
        n = x_nc.shape[0] * tdist.get_world_size()
        mean_c = _GlobalSum.apply(x_nc.sum(0)) / n
        centered = x_nc - mean_c
        var_c = _GlobalSum.apply(centered.square().sum(0)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean_c.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var_c.detach() * (n / max(n - 1, 1)),
                                                  alpha=m)
                self.num_batches_tracked.add_(1)
        return centered * torch.rsqrt(var_c + self.eps) * self.weight + self.bias


def sync_batch_norms(module: nn.Module) -> None:
    """Turn every ``BatchNorm1d`` inside ``module`` into a ``GlobalBatchNorm1d`` in place
    (the parameter and buffer objects are kept, so optimizers and state dicts still hold)."""
    for sub in module.modules():
        if type(sub) is nn.BatchNorm1d:
            sub.__class__ = GlobalBatchNorm1d


# -- a selection over the global batch (BatchTopK) ------------------------------------------
def kth_largest_over_ranks(flat: Tensor, kth_here: int) -> Tensor:
    """The ``K``-th largest entry of every rank's ``flat`` together (a 0-d tensor), where
    ``K`` is the sum of the ranks' ``kth_here``: what one process holding the whole batch
    would find. Each rank sends only its own top ``K`` candidates (the global top ``K`` are
    among them)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return torch.topk(flat, min(kth_here, flat.numel()), sorted=False).values.min()
    kth = torch.tensor([kth_here], dtype=torch.int64, device=flat.device)
    _checked(tdist.all_reduce, kth)
    k_all = int(kth)
    local = torch.topk(flat, min(k_all, flat.numel()), sorted=False).values
    padded = flat.new_full((k_all,), float("-inf"))
    padded[:local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(tdist.get_world_size())]
    _checked(tdist.all_gather, gathered, padded)
    return torch.topk(torch.cat(gathered), k_all, sorted=False).values.min()
