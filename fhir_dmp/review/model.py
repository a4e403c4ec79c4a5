"""The misuse scan's statistics and score, on scikit-learn (the ``privacy`` extra).

- :func:`outliers`: which values stand far above their peers' (``RobustScaler``: median and
  inter-quartile range, so that the outliers themselves do not hide in the spread);
- :func:`score`: one score in [0, 1] per (professional, DMP) pair, higher is more suspicious.
  Rule-weighted first: ``1 - Π(1 - w)`` over the pair's signals (:data:`WEIGHTS`), which ranks a
  pair with strong signals first; an ``IsolationForest`` over the pair features breaks ties
  among pairs with the same signals (an unusual number of accesses, documents, off-hours share).
  Once the officers have closed at least :data:`MIN_VERDICTS` anomaly cases of each outcome
  (``justified`` / ``unjustified``), a ``LogisticRegression`` fitted on the features of those
  pairs takes half of the score: the model learns which signals this population's officers find
  unjustified.
"""
from __future__ import annotations

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import MinMaxScaler, RobustScaler

from .signals import (ATTESTATION_ONLY, BREAK_GLASS_RATE, BULK, NO_RELATIONSHIP, OFF_HOURS, SAME_PLACE,
                      SAME_SURNAME, SHARED_CREDENTIAL, SIGNALS)

#: how much each signal alone says (the rule part of the score)
WEIGHTS = {NO_RELATIONSHIP: 0.35, ATTESTATION_ONLY: 0.35, SAME_SURNAME: 0.55, SAME_PLACE: 0.45, BULK: 0.5,
           SHARED_CREDENTIAL: 0.8, BREAK_GLASS_RATE: 0.7, OFF_HOURS: 0.15}
#: the share of the score the forest's ties-breaking takes
FOREST_SHARE = 0.1
#: verdicts of each outcome needed before learning from them
MIN_VERDICTS = 5
#: a value this many inter-quartile ranges above the peers' median is an outlier
OUTLIER_IQR = 3.0


def outliers(values: list[float], *, minimum: float) -> list[bool]:
    """For each value: far above the others (``OUTLIER_IQR`` robust units above the median) and at
    least ``minimum``. A spread of zero counts as one unit (scikit-learn's zero-scale rule)."""
    if not values:
        return []
    column = np.asarray(values, dtype=float).reshape(-1, 1)
    robust = RobustScaler().fit_transform(column).ravel()
    return [bool(z >= OUTLIER_IQR and v >= minimum) for z, v in zip(robust, values)]


def rule_score(signals: list[str]) -> float:
    keep = 1.0
    for code in signals:
        keep *= 1.0 - WEIGHTS.get(code, 0.0)
    return 1.0 - keep


def features(signals: list[str], numbers: list[float]) -> list[float]:
    """One pair's features: its signals (0/1, in :data:`SIGNALS` order), then its numbers."""
    return [1.0 if s in signals else 0.0 for s in SIGNALS] + [float(x) for x in numbers]


def learned(verdicts: list[tuple[list[float], bool]]) -> LogisticRegression | None:
    """A model of the officers' verdicts (``features``, unjustified?), when there are enough."""
    bad = sum(1 for _, y in verdicts if y)
    if bad < MIN_VERDICTS or len(verdicts) - bad < MIN_VERDICTS:
        return None
    width = min(len(x) for x, _ in verdicts)
    x = np.asarray([f[:width] for f, _ in verdicts], dtype=float)
    y = np.asarray([int(v) for _, v in verdicts])
    return LogisticRegression(class_weight="balanced", max_iter=1000).fit(x, y)


def score(rows: list[list[float]], rules: list[float], *, model: LogisticRegression | None = None,
          seed: int = 0) -> list[float]:
    """The score of each pair (module docstring): ``rows`` their :func:`features`, ``rules`` their
    :func:`rule_score`."""
    if not rows:
        return []
    x = np.asarray(rows, dtype=float)
    base = np.asarray(rules, dtype=float)
    if len(rows) >= 8:
        forest = IsolationForest(n_estimators=100, max_samples=min(256, len(rows)), random_state=seed).fit(x)
        odd = MinMaxScaler().fit_transform(-forest.score_samples(x).reshape(-1, 1)).ravel()
        base = (1.0 - FOREST_SHARE) * base + FOREST_SHARE * odd
    if model is not None:
        width = model.n_features_in_
        base = 0.5 * base + 0.5 * model.predict_proba(x[:, :width])[:, 1]
    return [round(float(min(max(v, 0.0), 1.0)), 4) for v in base]
