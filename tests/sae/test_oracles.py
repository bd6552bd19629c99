"""The tests' naive oracles (usae.sae.oracles) at their own edges: a name they do not know
is an error, not a silent default; the energy walk at exactly its goal; the global loss adds
AuxK only when asked."""

from __future__ import annotations

import pytest
import torch

from usae.config import resolve
from usae.sae import oracles
from usae.sae.model import UniversalSAE


def test_an_unknown_criterion_rule_or_aux_is_an_error_naming_it():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="^l3$"):
        oracles.naive_criterion("l3", x, x)
    assert float(oracles.naive_criterion("l2", x + 2, x)) == 4.0
    assert float(oracles.naive_criterion("l1", x + 2, x)) == 2.0
    cfg = resolve(("a",), (3,), "paper", {"n_concepts": 4, "k": 1}).sae
    with pytest.raises(ValueError, match="^TOPK$"):
        oracles.naive_rule_codes("TOPK", torch.ones(2, 4), cfg)
    sae = UniversalSAE(cfg)
    with pytest.raises(ValueError, match="^auxk$"):
        oracles.naive_step_loss(sae, {"a": x}, 0, aux="auxk")
    with pytest.raises(ValueError, match="^auxk$"):
        oracles.naive_global_step_loss(sae, {"a": x}, "l1", 0.0, rule="topk", aux="auxk",
                                       aux_k=1)


def test_the_energy_walk_stops_once_its_goal_is_reached_exactly():
    # squares 4 and 4 (k = 2); half of 8 is 4, which the first value reaches on its own
    codes = oracles.naive_energy_codes(torch.tensor([[2.0, 2.0, 0.0]]), 2, 0.5)
    assert int((codes > 0).sum()) == 1 and float(codes.sum()) == 2.0


def test_the_global_loss_has_no_auxk_term_unless_asked_for_it():
    torch.manual_seed(0)
    cfg = resolve(("a", "b"), (6, 5), "fast", {"n_concepts": 8, "k": 2,
                                                "active_set": "global"})
    sae = UniversalSAE(cfg.sae).double()
    xs = {"a": torch.randn(10, 6, dtype=torch.float64),
          "b": torch.randn(10, 5, dtype=torch.float64)}
    dead = torch.ones(8, dtype=torch.bool)
    with torch.no_grad():
        plain, _ = oracles.naive_global_step_loss(sae, xs, "l1", 0.0, rule="topk", aux="none",
                                                  aux_k=3)
        with_dead, _ = oracles.naive_global_step_loss(sae, xs, "l1", 0.0, rule="topk",
                                                      aux="none", aux_k=3, dead_c=dead)
        auxk, _ = oracles.naive_global_step_loss(sae, xs, "l1", 0.0, rule="topk", aux="gao",
                                                 aux_k=3, dead_c=dead)
    assert float(with_dead) == float(plain) and float(auxk) > float(plain)
