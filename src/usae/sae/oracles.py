"""Naive formulations of the training step, for tests and benchmarks only.

Nothing in the library imports this module. Each function is written out from the paper's
and the reference implementation's definitions with plain dense autograd (full sorts, dense
code matrices, every dictionary differentiated), and none of them calls the code it checks
(no ``usae.sae.step``, no ``usae.sae.fused``, not even ``normalize_rows``), so a bug there cannot
hide in both sides of a comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

DICT_EPS = 1e-8  # written out again on purpose: an oracle shares no code with the library


def naive_criterion(name: str, target: Tensor, estimate: Tensor) -> Tensor:
    """``l1``: mean |target - estimate|; ``l2``: mean squared error."""
    diff = target - estimate
    if name == "l1":
        return diff.abs().mean()
    if name == "l2":
        return (diff * diff).mean()
    raise ValueError(name)


def naive_unit_rows(w_nd: Tensor) -> Tensor:
    """Each dictionary row divided by (its L2 norm + 1e-8)."""
    return w_nd / (torch.sqrt((w_nd * w_nd).sum(dim=1, keepdim=True)) + DICT_EPS)


def naive_ball_rows(w_nd: Tensor) -> Tensor:
    """``dictionary_norm=ball``: each row longer than 1 divided by its norm, others kept."""
    norms = torch.sqrt((w_nd * w_nd).sum(dim=1, keepdim=True))
    return torch.where(norms > 1, w_nd / norms, w_nd)


def naive_dictionary(sae, model: str) -> Tensor:
    """The model's dictionary as the step uses it (unit rows, or ``ball`` rows)."""
    w = sae.dictionaries[model]
    return naive_ball_rows(w) if sae.cfg.dictionary_norm == "ball" else naive_unit_rows(w)


def naive_topk_codes(pre_nc: Tensor, k: int) -> Tensor:
    """Dense TopK(ReLU(pre)) codes (N, n)."""
    post = torch.relu(pre_nc)
    vals, idx = torch.topk(post, k, dim=1)
    return torch.zeros_like(post).scatter(1, idx, vals)


def naive_reference_aux_codes(pre_nc: Tensor, codes_nc: Tensor) -> Tensor:
    """The reference's auxiliary codes: a full ``topk(relu(pre) - z, n // 2)``, densified."""
    rest = torch.relu(pre_nc) - codes_nc
    top = torch.topk(rest, k=rest.shape[1] // 2, dim=1)
    return torch.zeros_like(rest).scatter(1, top.indices, top.values)


def naive_gao_aux_codes(pre_nc: Tensor, dead_c: Tensor, aux_k: int) -> Tensor:
    """AuxK: the top ``aux_k`` of ReLU(pre) restricted to dead concepts, densified."""
    post = torch.relu(pre_nc) * dead_c.to(pre_nc.dtype)
    k = min(aux_k, int(dead_c.sum()))
    vals, idx = torch.topk(post, k, dim=1)
    return torch.zeros_like(post).scatter(1, idx, vals)


def naive_batch_topk_codes(pre_nc: Tensor, k: int) -> Tensor:
    """BatchTopK by a full sort: the ``k * N`` largest of ReLU(pre) over the whole batch,
    densified (N, n); ties at the cut are all kept."""
    post = torch.relu(pre_nc)
    cut = torch.sort(post.reshape(-1), descending=True).values[k * post.shape[0] - 1]
    return post * ((post >= cut) & (post > 0))


def naive_energy_codes(pre_nc: Tensor, k: int, fraction: float) -> Tensor:
    """The energy rule one token at a time: walk down the token's k largest ReLU'd values
    and stop once the squares taken reach ``fraction`` of the k squares' sum; densified
    (N, n)."""
    post = torch.relu(pre_nc)
    codes = torch.zeros_like(post)
    for row in range(post.shape[0]):
        top = sorted(((float(v), c) for c, v in enumerate(post[row].detach())),
                     reverse=True)[:k]
        goal, taken = fraction * sum(v * v for v, _ in top), 0.0
        for v, c in top:
            if taken >= goal:
                break
            codes[row, c] = post[row, c]
            taken += v * v
    return codes


def naive_rule_codes(rule: str, pre_nc: Tensor, cfg) -> Tensor:
    """Dense codes (N, n) of sparsity rule ``rule`` (topk, batchtopk or energy) on
    ReLU(``pre_nc``), written out, for ``cfg``, the SAE config (k, energy_fraction)."""
    if rule == "batchtopk":
        return naive_batch_topk_codes(pre_nc, cfg.k)
    if rule == "energy":
        return naive_energy_codes(pre_nc, cfg.k, cfg.energy_fraction)
    if rule == "topk":
        return naive_topk_codes(pre_nc, cfg.k)
    raise ValueError(rule)


def _check_aux(aux: str) -> None:
    if aux not in ("none", "reference", "gao"):
        raise ValueError(aux)


def naive_step_loss(sae, xs: dict[str, Tensor], source: int, criterion: str = "l1",
                    aux: str = "reference", aux_coef: float = 0.1,
                    dead_c: Tensor | None = None, aux_k: int = 0, rule: str = "topk",
                    prefixes: tuple[int, ...] = ()) -> Tensor:
    """The universal step's loss as the reference writes it, every decoder differentiated.

    ``xs``: standardized batches ``{model: (N, d_m)}``; ``source``: index of the model whose
    encoder produces the codes. Sum over models j of ``crit(x_j, z D_j)`` plus
    ``aux_coef * crit(x_j - z D_j, a D_j)`` (``aux=reference``: a = top n/2 of relu(pre) - z;
    ``aux=gao``: a = AuxK over dead concepts and the residual is detached; ``none``: no term).
    ``rule``: topk, batchtopk or energy codes. ``prefixes``: Matryoshka; the reconstruction
    term is repeated with the codes of the concepts below each prefix size (columns cut off).
    """
    _check_aux(aux)
    src = sae.models[source]
    pre = sae.encoders[src](xs[src])
    codes = naive_rule_codes(rule, pre, sae.cfg)
    total = pre.new_zeros(())
    for m in sae.models:
        dict_nd = naive_dictionary(sae, m)
        for size in prefixes:
            total = total + naive_criterion(criterion, xs[m], codes[:, :size] @ dict_nd[:size])
        xhat = codes @ dict_nd
        total = total + naive_criterion(criterion, xs[m], xhat)
        if aux == "reference":
            aux_codes = naive_reference_aux_codes(pre, codes)  # full sort, once per decoder
            total = total + aux_coef * naive_criterion(criterion, xs[m] - xhat,
                                                       aux_codes @ dict_nd)
        elif aux == "gao" and dead_c is not None and bool(dead_c.any()):
            aux_codes = naive_gao_aux_codes(pre, dead_c, aux_k)
            total = total + aux_coef * naive_criterion(criterion, (xs[m] - xhat).detach(),
                                                       aux_codes @ dict_nd)
    return total


def naive_global_step_loss(sae, xs: dict[str, Tensor], criterion: str, cross_coef: float, *,
                           rule: str, aux: str, aux_k: int, aux_coef: float = 0.1,
                           dead_c: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Global TopK across models, written out: the rule (TopK, BatchTopK by a full sort, or
    energy) picks one active set per token from the mean of the models' ReLU'd
    pre-activations;
    model m's code is its own ReLU'd values on that set; sum over m of ``crit(x_m, z_m D_m)``
    (plus m's auxiliary term into its own model: ``reference`` or ``gao``, as
    ``naive_step_loss``) plus ``cross_coef`` x ``crit(x_j, z_m D_j)`` for every j != m.
    Returns (loss, fired: (n,) concepts with a positive code in some model)."""
    _check_aux(aux)
    pres = {m: sae.encoders[m](xs[m]) for m in sae.models}
    posts = {m: torch.relu(p) for m, p in pres.items()}
    mean = torch.stack([p.detach() for p in posts.values()]).mean(0)
    chosen = naive_rule_codes(rule, mean, sae.cfg)
    mask = chosen > 0
    dicts = {m: naive_dictionary(sae, m) for m in sae.models}
    total = mean.new_zeros(())
    fired = torch.zeros(mean.shape[1], dtype=torch.bool)
    for m in sae.models:
        code = posts[m] * mask
        fired |= (code.detach() > 0).any(0)
        for j in sae.models:
            term = naive_criterion(criterion, xs[j], code @ dicts[j])
            total = total + (term if j == m else cross_coef * term)
        resid = xs[m] - code @ dicts[m]
        if aux == "reference":
            total = total + aux_coef * naive_criterion(
                criterion, resid, naive_reference_aux_codes(pres[m], code) @ dicts[m])
        elif aux == "gao" and dead_c is not None and bool(dead_c.any()):
            total = total + aux_coef * naive_criterion(
                criterion, resid.detach(), naive_gao_aux_codes(pres[m], dead_c, aux_k)
                @ dicts[m])
    return total, fired
