"""Paired statistics for an A/B on the same prompts: per-prompt wins and losses, an exact McNemar test, and a
Wilson interval for each rate. With 30 prompts a rate moves in steps of 0.033, and chance alone moves it more."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: b = only B passes, c = only A passes."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: list[bool], b: list[bool]) -> dict:
    """A vs B on the same prompts: B's wins, losses and ties, McNemar's exact p, and each rate's 95% interval."""
    wins = sum(1 for x, y in zip(a, b) if y and not x)
    losses = sum(1 for x, y in zip(a, b) if x and not y)
    n = len(a)
    p = mcnemar_exact(wins, losses)
    return {"n": n, "wins": wins, "losses": losses, "ties": n - wins - losses, "p_value": p,
            "significant": p < 0.05, "a_ci95": [round(v, 3) for v in wilson(sum(a), n)],
            "b_ci95": [round(v, 3) for v in wilson(sum(b), n)]}
