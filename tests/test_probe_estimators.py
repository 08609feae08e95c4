"""The chips follow scikit-learn's estimator conventions (``parametrize_with_checks``)."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from chiptuning.probe import LinearChip, LogRegChip, MLPChip

ESTIMATORS = [
    LinearChip(epochs=30, lr=1e-2, random_state=0),
    MLPChip(hidden=16, epochs=30, lr=1e-2, random_state=0),
    LogRegChip(random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible(estimator, check):
    check(estimator)
