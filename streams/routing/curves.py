"""Quality against the share of requests sent to the top tier, and the figures read off it.

A routing score orders the requests: the top-scored share goes to the top tier, the
rest to the tier below it. Requests with equal scores are taken in random order, and the
curve is the expectation over that order, exactly: between two distinct scores it is a
straight line. So a strategy that scores everything alike (``random``) is the diagonal,
and its APGR is 0.5 by construction rather than by luck.

Definitions follow RouteLLM (Ong et al., ICLR 2025): PGR, the performance gap
recovered, is ``(quality - low) / (top - low)``; APGR is its area over top-tier shares in
[0, 1]; CPT(x) is the smallest top-tier share whose PGR reaches x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curve:
    shares: np.ndarray  # top-tier share at each breakpoint, 0 ... 1
    quality: np.ndarray  # mean quality at each breakpoint
    low: float  # mean quality when every request goes to the tier below the top
    top: float  # mean quality when every request goes to the top tier

    def share_reaching(self, quality: float) -> float:
        """The smallest top-tier share whose expected quality reaches ``quality``."""
        reached = np.flatnonzero(self.quality >= quality - 1e-12)
        if reached.size == 0:
            return 1.0
        i = int(reached[0])
        if i == 0:
            return 0.0
        q0, q1 = self.quality[i - 1], self.quality[i]
        s0, s1 = self.shares[i - 1], self.shares[i]
        return float(s0 + (s1 - s0) * (quality - q0) / (q1 - q0))

    def share_for_quality_ratio(self, ratio: float) -> float:
        """The share whose quality reaches ``ratio`` of the all-top quality."""
        return self.share_reaching(ratio * self.top)

    @property
    def gap(self) -> float:
        return self.top - self.low

    def pgr(self) -> np.ndarray | None:
        return None if self.gap <= 0 else (self.quality - self.low) / self.gap

    def apgr(self) -> float | None:
        pgr = self.pgr()
        if pgr is None:
            return None
        return float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(self.shares)))

    def cpt(self, recovered: float) -> float | None:
        """The smallest share that recovers ``recovered`` (0.5: half) of the gap."""
        if self.gap <= 0:
            return None
        return self.share_reaching(self.low + recovered * self.gap)


def quality_curve(scores: Sequence[float], low: Sequence[float], top: Sequence[float]) -> Curve:
    """The curve of a routing score: higher score, sent to the top tier first.

    ``low`` and ``top`` are each request's quality with the tier below the top and with
    the top tier."""
    score = np.asarray(scores, dtype=np.float64)
    low_q = np.asarray(low, dtype=np.float64)
    top_q = np.asarray(top, dtype=np.float64)
    n = len(score)
    if n == 0 or not (len(low_q) == len(top_q) == n):
        raise ValueError("scores and qualities must be non-empty and of one length")
    order = np.argsort(-score, kind="stable")
    sorted_scores = score[order]
    gain = np.cumsum((top_q - low_q)[order])
    # The last request of each run of equal scores: the curve bends only there.
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    shares = np.concatenate([[0.0], (ends + 1) / n])
    quality = (low_q.sum() + np.concatenate([[0.0], gain[ends]])) / n
    return Curve(shares, quality, float(low_q.mean()), float(top_q.mean()))
