"""Exact allocation: one option per group, minimal total sensitivity, every budget respected.

A multiple-choice knapsack written as a 0-1 integer program and solved by HiGHS
(``scipy.optimize.milp``, relative gap 0; costs scaled so that its absolute gap of 1e-6 is
1e-10 of the largest sensitivity)::

    minimise   sum_{g,c} s[g,c] x[g,c]
    subject to sum_c x[g,c] = 1                      for every group g
               sum_{g,c} u_k[g,c] x[g,c] <= cap_k    for every budget k
               x[g,c] in {0, 1}

The rounded solution is checked against every budget in exact arithmetic (bytes and bit counts
are integers); a solver tolerance that let a budget slip by is tightened and the program solved
again. :func:`brute_force` enumerates every assignment (small problems; tests).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["KINDS", "Problem", "solve", "brute_force", "InfeasibleBudget"]

KINDS = ("size", "bytes", "bits", "bitops")
_SCALE = 1e4  # the largest |cost| after scaling


class InfeasibleBudget(ValueError):
    """No assignment fits the budget."""


@dataclass
class Problem:
    """``costs[g][c]``: sensitivity of option c of group g; ``usage[k][g][c]``: what it uses of
    budget k; ``caps[k]``: what the options may use in all."""

    costs: list[list[float]]
    usage: dict[str, list[list[float]]] = field(default_factory=dict)
    caps: dict[str, float] = field(default_factory=dict)

    def total(self, choice: Sequence[int], kind: str | None = None) -> float:
        rows = self.costs if kind is None else self.usage[kind]
        return math.fsum(rows[g][c] for g, c in enumerate(choice))

    def fits(self, choice: Sequence[int]) -> bool:
        return all(self.total(choice, k) <= cap + _slack(cap) for k, cap in self.caps.items())

    def floor(self, kind: str) -> float:
        """The least any assignment uses of budget ``kind``."""
        return math.fsum(min(row) for row in self.usage[kind])


def _slack(cap: float) -> float:
    """Rounding room for non-integer usages (bit-operations per example); 0 for integers."""
    return 0.0 if float(cap).is_integer() else 1e-9 * abs(cap)


def solve(problem: Problem, max_rounds: int = 5) -> list[int]:
    """The option index per group of least total cost within every cap (exact, see module doc).
    Raises :class:`InfeasibleBudget` when nothing fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    for k in problem.caps:
        if problem.floor(k) > problem.caps[k] + _slack(problem.caps[k]):
            raise InfeasibleBudget(f"{k}: the smallest assignment needs {problem.floor(k):.6g}, "
                                   f"the budget leaves {problem.caps[k]:.6g}")
    sizes = [len(row) for row in problem.costs]
    if any(s == 0 for s in sizes):
        raise ValueError("every group needs at least one option")
    n = sum(sizes)
    start = np.cumsum([0, *sizes[:-1]])
    cost = np.array([c for row in problem.costs for c in row], dtype=np.float64)
    top = float(np.abs(cost).max()) if n else 0.0
    cost = cost * (_SCALE / top) if top > 0 else cost
    one = np.zeros((len(sizes), n))
    for g, (s0, s) in enumerate(zip(start, sizes, strict=True)):
        one[g, s0:s0 + s] = 1.0
    caps = dict(problem.caps)
    for _ in range(max_rounds):
        cons = [LinearConstraint(one, 1.0, 1.0)]
        for k, cap in caps.items():
            row = np.array([u for r in problem.usage[k] for u in r], dtype=np.float64)
            scale = max(abs(cap), 1.0)
            cons.append(LinearConstraint((row / scale)[None, :], -np.inf, cap / scale))
        res = milp(cost, constraints=cons, integrality=np.ones(n), bounds=Bounds(0.0, 1.0),
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            raise InfeasibleBudget(f"no assignment fits every budget ({res.message})")
        x = np.round(res.x).astype(int)
        choice = [int(np.argmax(x[s0:s0 + s])) for s0, s in zip(start, sizes, strict=True)]
        over = {k: problem.total(choice, k) - cap for k, cap in problem.caps.items()
                if problem.total(choice, k) > cap + _slack(cap)}
        if not over:
            return choice
        for k, excess in over.items():  # a tolerance let it slip: tighten and solve again
            caps[k] = caps[k] - excess
    raise InfeasibleBudget(f"the solver kept exceeding the budget by {over}")


def brute_force(problem: Problem) -> list[int] | None:
    """Every assignment tried (product of the option counts): the least-cost one that fits."""
    best, best_cost = None, math.inf
    for choice in itertools.product(*(range(len(r)) for r in problem.costs)):
        if problem.fits(choice):
            c = problem.total(choice)
            if c < best_cost:
                best, best_cost = list(choice), c
    return best
