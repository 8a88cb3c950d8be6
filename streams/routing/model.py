"""The learned router: predicted quality per tier, calibrated, and a threshold for a target.

Training (:func:`train_router`):

1. Features (``streams.routing.features``) and one gradient-boosted classifier of the
   joint outcome of the tiers (with two tiers: both right, only the top tier right, only
   the lower tier right, both wrong). Modelling the joint outcome, rather than each
   tier's quality alone, is what makes the difference between tiers learnable: the
   prompts a weaker model fails are mostly the ones a stronger model fails too. Scores
   between 0 and 1 count as probabilities of "right": a row is split over the outcomes
   by weight.
2. For each tier below the top, a raw loss score, the expected quality the top tier
   would add, calibrated by a line fitted to out-of-fold predictions (folds hold out
   whole ``source`` families when there are enough), so it estimates the real loss.
3. A threshold on the calibrated loss: a request goes to the cheapest tier whose
   expected loss is at most the threshold, else to the top tier. The threshold is the
   largest (cheapest) one whose realised quality on the out-of-fold predictions meets the
   quality target, the way RouteLLM calibrates its threshold on held-out data. The
   out-of-fold evidence is kept in the file, so a different target re-picks it at load.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sklearn
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import GroupKFold, KFold
from threadpoolctl import ThreadpoolController

from schemas.models import Tier
from schemas.routing import RoutingExample
from streams.routing.data import RoutingData
from streams.routing.features import Featurizer

FORMAT_VERSION = 1
MAGIC = b"TIERSTREAM-ROUTER\n"
FOLDS = 5
MIN_EXAMPLES = 10
THRESHOLD_CANDIDATES = 2048
# The least slope of a calibration: a raw score without signal still orders requests.
TIE_BREAK = 1e-6


class RouterModelError(ValueError):
    """A router file that cannot be used: missing, corrupt, or from another version."""


def _estimator(seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=40, random_state=seed
    )


class _Constant:
    """The outcome distribution seen in training, for data with one outcome only."""

    def __init__(self, classes: np.ndarray) -> None:
        self.classes_ = classes

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return np.ones((len(features), 1))


def _joint_outcomes(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each example split over the 2^T joint right/wrong outcomes by weight.

    Returns the example index, the outcome (bit t: tier t right) and the weight of each
    row; rows of zero weight are left out, so 0/1 scores give one row per example."""
    n, tiers = scores.shape
    outcomes = np.arange(2**tiers)
    bits = (outcomes[:, None] >> np.arange(tiers)) & 1  # (outcomes, tiers)
    weights = np.prod(np.where(bits[None, :, :] == 1, scores[:, None, :], 1 - scores[:, None, :]), axis=2)
    example, outcome = np.nonzero(weights > 0)
    return example, outcome, weights[example, outcome]


def _fit_estimator(features: np.ndarray, scores: np.ndarray, seed: int) -> Any:
    example, outcome, weight = _joint_outcomes(scores)
    if len(np.unique(outcome)) < 2:
        return _Constant(np.unique(outcome))
    return _estimator(seed).fit(features[example], outcome, sample_weight=weight)


def _raw_losses(estimator: Any, features: np.ndarray, tiers: int) -> np.ndarray:
    """Expected quality the top tier adds over each lower tier: (examples, tiers - 1)."""
    proba = estimator.predict_proba(features)
    bits = (np.asarray(estimator.classes_)[:, None] >> np.arange(tiers)) & 1
    quality = proba @ bits  # expected quality of each tier
    return quality[:, -1:] - quality[:, :-1]


def grouped_folds(count: int, groups: Sequence[str | None], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole ``source`` families held out when there are enough of them, else rows."""
    distinct = {g for g in groups if g is not None}
    index = np.arange(count)
    if len(distinct) >= 2 and None not in groups:
        k = min(FOLDS, len(distinct))
        return list(GroupKFold(n_splits=k).split(index, groups=list(groups)))
    return list(KFold(n_splits=min(FOLDS, count), shuffle=True, random_state=seed).split(index))


@dataclass(frozen=True)
class LossCalibration:
    """Raw loss score -> expected quality lost: a straight line fitted by least squares
    on out-of-fold predictions. Strictly increasing, so it keeps the raw order; a step
    function (isotonic regression) was tried and merged hundreds of requests into one
    value, which scrambles their order once folds are pooled."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, raw: np.ndarray, realised: np.ndarray) -> LossCalibration:
        if len(raw) < 2 or np.ptp(raw) == 0:
            return cls(float(np.mean(realised)) if len(realised) else 0.0, TIE_BREAK)
        slope, intercept = np.polyfit(raw, realised, 1)
        # No signal (or an inverted one) in the raw score: its order is kept, barely.
        return cls(float(intercept), float(max(slope, TIE_BREAK)))

    def predict(self, raw: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * raw


@functools.cache
def _threads() -> ThreadpoolController:
    return ThreadpoolController()


def _calibrated(calibrators: Sequence[LossCalibration], raw: np.ndarray) -> np.ndarray:
    return np.column_stack([c.predict(raw[:, i]) for i, c in enumerate(calibrators)])


def _check_target(quality_target: float) -> None:
    if not 0 < quality_target <= 1:
        raise ValueError("quality_target must be in (0, 1]")


def choose_tiers(losses: np.ndarray, threshold: float) -> np.ndarray:
    """Per request, the index of the cheapest tier whose expected loss is at most the
    threshold; the top tier (index ``losses.shape[1]``) when none is."""
    within = losses <= threshold
    top = losses.shape[1]
    return np.where(within.any(axis=1), within.argmax(axis=1), top)


def pick_threshold(losses: np.ndarray, scores: np.ndarray, quality_target: float) -> float:
    """The largest threshold whose realised quality is at least ``quality_target`` of
    the all-top-tier quality: each request's tier only gets cheaper as it grows."""
    wanted = quality_target * scores[:, -1].mean()
    values = np.unique(losses)
    if len(values) > THRESHOLD_CANDIDATES:
        values = np.unique(np.quantile(losses, np.linspace(0, 1, THRESHOLD_CANDIDATES)))
    rows = np.arange(len(scores))
    for threshold in values[::-1]:
        if scores[rows, choose_tiers(losses, threshold)].mean() >= wanted - 1e-12:
            return float(threshold)
    return float(-np.inf)  # every request to the top tier


@dataclass(frozen=True)
class RouterModel:
    tiers: tuple[Tier, ...]  # cheapest first; the last is the top tier
    featurizer: Featurizer
    estimator: Any
    calibrators: tuple[LossCalibration, ...]  # one per tier below the top
    quality_target: float
    threshold: float
    # Out-of-fold calibrated losses and the real scores of the training data: what the
    # threshold was picked on, kept to re-pick it for another target.
    evidence_losses: np.ndarray
    evidence_scores: np.ndarray
    metadata: dict[str, Any]

    @property
    def top(self) -> Tier:
        return self.tiers[-1]

    def losses(self, texts: Sequence[str], agent_types: Sequence[str | None]) -> np.ndarray:
        """Expected quality lost per request and lower tier, against the top tier."""
        features = self.featurizer.transform(texts, agent_types)
        # A batch is a few hundred rows: OpenMP threads cost more to wake than they
        # save, and spin on a busy machine (measured: 20 ms against 0.1 ms per request).
        with _threads().limit(limits=1, user_api="openmp"):
            raw = _raw_losses(self.estimator, features, len(self.tiers))
        return _calibrated(self.calibrators, raw)

    def route(self, texts: Sequence[str], agent_types: Sequence[str | None]) -> list[Tier]:
        if not texts:
            return []
        return [self.tiers[i] for i in choose_tiers(self.losses(texts, agent_types), self.threshold)]

    def with_quality_target(self, quality_target: float) -> RouterModel:
        _check_target(quality_target)
        threshold = pick_threshold(self.evidence_losses, self.evidence_scores, quality_target)
        return replace(self, quality_target=quality_target, threshold=threshold)

    # --------------------------------------------------------------------- the file

    def save(self, path: str | Path) -> None:
        payload = pickle.dumps(
            {
                "tiers": [t.value for t in self.tiers],
                "featurizer": self.featurizer,
                "estimator": self.estimator,
                "calibrators": self.calibrators,
                "quality_target": self.quality_target,
                "threshold": self.threshold,
                "evidence_losses": self.evidence_losses,
                "evidence_scores": self.evidence_scores,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        header = orjson.dumps(
            {"format_version": FORMAT_VERSION, "payload_sha256": hashlib.sha256(payload).hexdigest(),
             "metadata": self.metadata},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        Path(path).write_bytes(MAGIC + struct.pack(">Q", len(header)) + header + payload)


def read_header(raw: bytes, name: str) -> tuple[dict[str, Any], bytes]:
    if not raw.startswith(MAGIC):
        raise RouterModelError(f"{name} is not a tierstream router file")
    body = raw[len(MAGIC) :]
    try:
        (length,) = struct.unpack(">Q", body[:8])
        header = orjson.loads(body[8 : 8 + length])
    except (struct.error, orjson.JSONDecodeError):
        raise RouterModelError(f"{name} is corrupt: its header cannot be read") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        found = header.get("format_version") if isinstance(header, dict) else None
        raise RouterModelError(
            f"{name} has router format version {found}; this tierstream reads version "
            f"{FORMAT_VERSION}: train it again with `tierstream router train`"
        )
    return header, body[8 + length :]


def load_router(path: str | Path) -> RouterModel:
    """Read a router file; :class:`RouterModelError` says why one cannot be used.

    The payload is a pickle: load only router files you trust, as you would code."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RouterModelError(f"cannot read router file {path}: {exc.strerror}") from None
    header, payload = read_header(raw, str(path))
    meta = header.get("metadata", {})
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise RouterModelError(f"{path} is corrupt: its contents do not match their checksum")
    written_by = meta.get("versions", {}).get("scikit-learn", "?")
    if _minor(written_by) != _minor(sklearn.__version__):
        raise RouterModelError(
            f"{path} was written with scikit-learn {written_by}, this is {sklearn.__version__}: "
            "train it again with `tierstream router train`"
        )
    try:
        state = pickle.load(io.BytesIO(payload))
        return RouterModel(
            tiers=tuple(Tier(t) for t in state["tiers"]),
            featurizer=state["featurizer"],
            estimator=state["estimator"],
            calibrators=tuple(state["calibrators"]),
            quality_target=float(state["quality_target"]),
            threshold=float(state["threshold"]),
            evidence_losses=state["evidence_losses"],
            evidence_scores=state["evidence_scores"],
            metadata=meta,
        )
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle raises: the file is unusable
        raise RouterModelError(f"{path} is corrupt: {type(exc).__name__}: {exc}") from None


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "scikit-learn": sklearn.__version__, "numpy": np.__version__}
    try:
        found["tierstream"] = package_metadata.version("tierstream")
    except package_metadata.PackageNotFoundError:
        found["tierstream"] = "unknown"
    return found


def example_arrays(examples: Sequence[RoutingExample], tiers: Sequence[Tier]) -> tuple[list[str], list[str | None], np.ndarray]:
    texts = [e.text() for e in examples]
    agent_types = [e.agent_type for e in examples]
    scores = np.array([[e.scores[t] for t in tiers] for e in examples], dtype=np.float64)
    return texts, agent_types, scores


def _fit_core(texts: list[str], agent_types: list[str | None], scores: np.ndarray, seed: int) -> tuple[Featurizer, Any]:
    featurizer = Featurizer.fit(texts, agent_types, seed)
    return featurizer, _fit_estimator(featurizer.transform(texts, agent_types), scores, seed)


def train_router(data: RoutingData, quality_target: float = 0.95, seed: int = 0) -> RouterModel:
    # One OpenMP thread: on a machine whose cores are busy, threads spinning on each
    # other cost far more than the parallel fit saves.
    with _threads().limit(limits=1, user_api="openmp"):
        return _train(data, quality_target, seed)


def _train(data: RoutingData, quality_target: float, seed: int) -> RouterModel:
    _check_target(quality_target)
    examples = data.examples
    if len(examples) < MIN_EXAMPLES:
        raise ValueError(f"training needs at least {MIN_EXAMPLES} examples, the data has {len(examples)}")
    texts, agent_types, scores = example_arrays(examples, data.tiers)
    groups = [e.source for e in examples]
    raw_oof = np.zeros((len(examples), len(data.tiers) - 1))
    folds = grouped_folds(len(examples), groups, seed)
    for train, held_out in folds:
        featurizer, estimator = _fit_core([texts[i] for i in train], [agent_types[i] for i in train], scores[train], seed)
        features = featurizer.transform([texts[i] for i in held_out], [agent_types[i] for i in held_out])
        raw_oof[held_out] = _raw_losses(estimator, features, len(data.tiers))
    realised = scores[:, -1:] - scores[:, :-1]
    calibrators = tuple(LossCalibration.fit(raw_oof[:, i], realised[:, i]) for i in range(raw_oof.shape[1]))
    evidence = _calibrated(calibrators, raw_oof)
    featurizer, estimator = _fit_core(texts, agent_types, scores, seed)
    threshold = pick_threshold(evidence, scores, quality_target)
    chosen = choose_tiers(evidence, threshold)
    rows = np.arange(len(scores))
    metadata = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "tiers": [t.value for t in data.tiers],
        "data_sha256": data.sha256,
        "examples": len(examples),
        "sources": len({g for g in groups if g is not None}),
        "folds": len(folds),
        "features": featurizer.names,
        "estimator": "HistGradientBoostingClassifier over the tiers' joint outcomes",
        "calibration": "least-squares line through out-of-fold losses",
        "quality_target": quality_target,
        "threshold": threshold,
        "out_of_fold": {
            "top_share": float(np.mean(chosen == len(data.tiers) - 1)),
            "quality_ratio": float(scores[rows, chosen].mean() / scores[:, -1].mean()) if scores[:, -1].mean() else None,
        },
        "seed": seed,
        "versions": _versions(),
    }
    return RouterModel(
        tiers=data.tiers, featurizer=featurizer, estimator=estimator, calibrators=calibrators,
        quality_target=quality_target, threshold=threshold, evidence_losses=evidence,
        evidence_scores=scores, metadata=metadata,
    )


DEFAULT_ROUTER_PATH = Path(__file__).resolve().parent / "default.router"


def configured_router(model: Path | None, quality_target: float | None) -> RouterModel:
    """The router ``classifier.learned`` names, loaded once at start; an unusable file is
    a configuration error that names the field."""
    from topologies.config import ConfigError

    try:
        router = load_router(model or DEFAULT_ROUTER_PATH)
    except RouterModelError as exc:
        raise ConfigError(f"classifier.learned.model: {exc}") from None
    if quality_target is not None:
        router = router.with_quality_target(quality_target)
    return router
