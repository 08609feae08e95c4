"""Chips: scikit-learn-compatible classifiers on one layer's features.

* :class:`LinearChip`: ``softmax(W x + b)`` in torch;
* :class:`MLPChip`: ``W1 ReLU(W2 x + b2) + b1`` in torch (hidden 256 by default);
* :class:`LogRegChip`: scikit-learn's ``LogisticRegression``.

Each standardizes its features with statistics of its training rows (saved as ``mean_`` /
``scale_``) and takes an optional ``class_mask`` keyword, (N, C) bool, True where a class is valid
for that row (C3 rows have 2 to 4 options): a masked class gets zero probability and is never
predicted; the torch chips also leave it out of the loss. A torch chip trains as a bank of one
layer and one setting (:mod:`chiptuning.probe.bank`), with the same :class:`Hyperparams`.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from chiptuning.probe.bank import Hyperparams, fit_banks, predict_logits, resolve_precision
from chiptuning.probe.data import InMemoryBatches, as_class_mask, split_validation, standardization, standardize_into

CHIP_KINDS = ("linear", "mlp", "logreg")
#: The arrays each chip kind saves (:meth:`state_tensors`), all it needs to predict: stored in
#: safetensors, never as a pickle.
STATE_KEYS = {
    "linear": ("weight", "bias", "mean", "scale"),
    "mlp": ("weight_hidden", "bias_hidden", "weight", "bias", "mean", "scale"),
    "logreg": ("coef", "intercept", "mean", "scale", "seen", "n_iter"),
}
H = Hyperparams()


class _ChipBase(ClassifierMixin, BaseEstimator):
    """What every chip shares: label encoding, standardization, masking, predict / score (from the
    subclass's ``_masked_scores``: (N, C) logits, or log-probabilities for logreg, masked ones -inf)."""

    def _encode_fit(self, X, y, class_mask):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y) if self.classes is None else np.asarray(self.classes)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"labels {unknown.tolist()} are not in classes={self.classes_.tolist()}")
        y_idx = np.searchsorted(self.classes_, y)
        mask = as_class_mask(class_mask, len(y), len(self.classes_))
        if mask is not None and not mask[np.arange(len(y)), y_idx].all():
            raise ValueError("class_mask marks the true class of some row as invalid")
        return X, y_idx.astype(np.int64), mask

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def _check_predict_input(self, X, class_mask):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return X, as_class_mask(class_mask, X.shape[0], len(self.classes_))

    def decision_function(self, X, class_mask=None) -> np.ndarray:
        """Logits (N, C), masked classes -inf; for two classes the logit difference (N,), as scikit-learn."""
        scores = self._masked_scores(X, class_mask)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X, class_mask=None) -> np.ndarray:
        """Class probabilities (N, C), columns in ``classes_`` order; masked classes get 0."""
        scores = torch.from_numpy(np.asarray(self._masked_scores(X, class_mask), dtype=np.float64))
        return torch.softmax(scores, dim=1).numpy()

    def predict(self, X, class_mask=None) -> np.ndarray:
        """Predicted labels (N,); a masked class is never predicted."""
        scores = self._masked_scores(X, class_mask)  # checks that the chip is fitted
        return self.classes_[np.argmax(scores, axis=1)]

    def score(self, X, y, sample_weight=None, class_mask=None) -> float:
        """Accuracy (with the class mask applied when given)."""
        return float(np.average(self.predict(X, class_mask=class_mask) == np.asarray(y), weights=sample_weight))


class _TorchChip(_ChipBase):
    """A torch chip. Its parameters are :class:`Hyperparams` fields (``early_stopping`` holds out
    ``validation_fraction`` of the rows, seeded) and ``classes`` (every label, in order: pass it
    when a class may be missing from the training rows), ``random_state`` (of the initialisation,
    the order and the validation split), ``shuffle``, ``device``, ``verbose`` (unused, the
    scikit-learn convention); ``precision`` "auto" is bfloat16 on CPUs with AMX / AVX512-BF16 in
    training, and prediction is float32. A subclass maps its arrays to and from the bank layout
    (a chip axis of 1) in ``_params_tensors`` / ``_set_params``."""

    _kind = "linear"

    def hyperparams(self) -> Hyperparams:
        own = {f.name: getattr(self, f.name) for f in fields(Hyperparams) if hasattr(self, f.name)}
        return Hyperparams(**dict(own, kind=self._kind, precision=resolve_precision(self.precision, self.device)))

    def fit(self, X, y, class_mask=None):
        """Train on (N, H) features and (N,) labels; ``class_mask`` (N, C), columns in ``classes_``
        order, leaves the masked classes out of the loss."""
        X, y_idx, mask = self._encode_fit(X, y, class_mask)
        seed = _seed(self.random_state)
        n, width = X.shape
        train_rows, val_rows = np.arange(n), None
        if self.early_stopping:
            n_val = max(1, int(round(self.validation_fraction * n)))
            if n_val >= n:
                raise ValueError(f"validation_fraction={self.validation_fraction} leaves no training rows")
            train_rows, val_rows = split_validation(n, n_val, seed)
        spec = self.hyperparams()
        self.mean_, self.scale_ = standardization(X, self.standardize, rows=train_rows, center=spec.fit_intercept)
        y_t, m_t = torch.from_numpy(y_idx), None if mask is None else torch.from_numpy(mask)

        def part(rows, dtype):  # (1, n, H), standardized as the bank trainer does (float32, then dtype)
            x = standardize_into(X, self.mean_, self.scale_, torch.empty((len(rows), width), dtype=dtype), rows=rows)
            idx = torch.from_numpy(rows)
            return x.unsqueeze(0), y_t[idx], None if m_t is None else m_t[idx]

        x_tr, y_tr, m_tr = part(train_rows, torch.bfloat16 if spec.precision == "bfloat16" else torch.float32)
        data = InMemoryBatches(x_tr, y_tr, m_tr, self.batch_size, seed, shuffle=self.shuffle)
        val = None if val_rows is None else part(val_rows, torch.float32)
        result = fit_banks(data, [spec], width, len(self.classes_), seed=seed, val=val, device=self.device)[0]
        self._set_params({k: v[0].numpy() for k, v in result["params"].items()})
        self.n_iter_, self.best_epoch_ = int(result["epochs_run"]), int(result["best_epoch"][0])
        return self

    def _masked_scores(self, X, class_mask) -> np.ndarray:
        X, mask = self._check_predict_input(X, class_mask)
        x = torch.from_numpy(self._standardize(X)).unsqueeze(0)  # (1, N, H)
        params = {k: v.to(self.device) for k, v in self._params_tensors().items()}
        return predict_logits(self._kind, params, x, None if mask is None else torch.from_numpy(mask))[0].numpy()

    def state_tensors(self) -> dict[str, np.ndarray]:
        """What is saved: the learned arrays in the bank layout
        (:func:`~chiptuning.probe.bank.param_shapes`), ``mean`` and ``scale``."""
        check_is_fitted(self)
        return {**{k: v[0].numpy() for k, v in self._params_tensors().items()}, "mean": self.mean_, "scale": self.scale_}

    def load_state(self, state: dict[str, np.ndarray], classes) -> _TorchChip:
        """Set the learned state from :meth:`state_tensors` arrays (used when loading)."""
        self.classes_ = np.asarray(classes)
        self.mean_ = np.asarray(state["mean"], dtype=np.float32)
        self.scale_ = np.asarray(state["scale"], dtype=np.float32)
        self.n_features_in_ = int(self.mean_.shape[0])
        self._set_params({k: np.asarray(v, dtype=np.float32) for k, v in state.items() if k not in ("mean", "scale")})
        return self


class LinearChip(_TorchChip):
    """Linear chip ``softmax(W x + b)`` trained with AdamW on standardized features (see
    :class:`_TorchChip` for the parameters; without ``fit_intercept`` the features are only scaled,
    so the folded chip is bias-free).

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_`` (H,), ``coef_`` (C, H) and
    ``intercept_`` (C,) on standardized features (``linear_weights()`` folds the standardization
    in), ``n_iter_``, ``best_epoch_``.
    """

    _kind = "linear"

    def __init__(self, *, lr: float = H.lr, weight_decay: float = H.weight_decay, epochs: int = H.epochs,
                 batch_size: int = H.batch_size, betas: tuple[float, float] = H.betas, standardize: bool = True,
                 early_stopping: bool = False, validation_fraction: float = 0.1,
                 n_iter_no_change: int = H.n_iter_no_change, min_patience_steps: int = H.min_patience_steps,
                 tol: float = H.tol, shuffle: bool = True, fit_intercept: bool = True, classes=None, random_state=None,
                 device: str = "cpu", verbose: int = 0, precision: str = "auto") -> None:
        vars(self).update({k: v for k, v in locals().items() if k != "self"})

    def _set_params(self, params):
        self.coef_, self.intercept_ = params["weight"].copy(), params["bias"].copy()  # (C, H), (C,)

    def _params_tensors(self):
        return {"weight": torch.from_numpy(np.ascontiguousarray(self.coef_)).unsqueeze(0),
                "bias": torch.from_numpy(self.intercept_).unsqueeze(0)}

    def linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W (C, H), b (C,)) acting on raw features: the standardization folded in (a logistic
        chip's in scikit-learn's shapes: one row for two classes)."""
        check_is_fitted(self)
        weight = self.coef_ / self.scale_[None, :]
        return weight, self.intercept_ - weight @ self.mean_


class MLPChip(_TorchChip):
    """Two-layer MLP chip ``W1 ReLU(W2 x + b2) + b1`` trained with AdamW (see :class:`_TorchChip`
    for the parameters; ``hidden``: the width D).

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_`` (H,), ``coefs_`` =
    [W2 (H, D), W1 (D, C)] and ``intercepts_`` = [b2 (D,), b1 (C,)] (scikit-learn's MLP layout),
    ``n_iter_``, ``best_epoch_``.
    """

    _kind = "mlp"

    def __init__(self, *, hidden: int = H.hidden, lr: float = H.lr, weight_decay: float = H.weight_decay,
                 epochs: int = H.epochs, batch_size: int = H.batch_size, betas: tuple[float, float] = H.betas,
                 standardize: bool = True, early_stopping: bool = False, validation_fraction: float = 0.1,
                 n_iter_no_change: int = H.n_iter_no_change, min_patience_steps: int = H.min_patience_steps,
                 tol: float = H.tol, shuffle: bool = True, classes=None, random_state=None, device: str = "cpu",
                 verbose: int = 0, precision: str = "auto") -> None:
        vars(self).update({k: v for k, v in locals().items() if k != "self"})

    def _set_params(self, params):
        # scikit-learn's MLP layout is (in, out); the bank's is (out, in).
        self.coefs_ = [np.ascontiguousarray(params["weight_hidden"].T), np.ascontiguousarray(params["weight"].T)]
        self.intercepts_ = [params["bias_hidden"].copy(), params["bias"].copy()]  # (D,), (C,)

    def _params_tensors(self):
        names = (("weight_hidden", self.coefs_[0].T), ("bias_hidden", self.intercepts_[0]),
                 ("weight", self.coefs_[1].T), ("bias", self.intercepts_[1]))
        return {k: torch.from_numpy(np.ascontiguousarray(v)).unsqueeze(0) for k, v in names}


class LogRegChip(_ChipBase):
    """scikit-learn ``LogisticRegression`` (``C``, ``max_iter``, ``tol``, ``random_state``,
    ``verbose``: its own) on standardized features; the class mask acts at prediction only.

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_``, ``estimator_`` (the fitted
    ``LogisticRegression``), ``coef_`` / ``intercept_`` (on standardized features;
    ``linear_weights()`` folds the standardization). It saves as those arrays
    (:meth:`state_tensors`) and :meth:`load_state` rebuilds the estimator from them: no pickle.
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, standardize: bool = True,
                 classes=None, random_state=None, verbose: int = 0) -> None:
        vars(self).update({k: v for k, v in locals().items() if k != "self"})

    def _estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state,
                                  verbose=self.verbose)

    def fit(self, X, y, class_mask=None):
        """Fit on (N, H) features and (N,) labels; ``class_mask`` is checked, used at prediction."""
        X, y_idx, _ = self._encode_fit(X, y, class_mask)
        self.mean_, self.scale_ = standardization(X, self.standardize)
        self.estimator_ = self._estimator().fit(self._standardize(X), y_idx)
        self.coef_, self.intercept_ = self.estimator_.coef_, self.estimator_.intercept_
        self.n_iter_ = int(np.max(self.estimator_.n_iter_))
        return self

    def _masked_scores(self, X, class_mask) -> np.ndarray:
        X, mask = self._check_predict_input(X, class_mask)
        log_proba = np.full((X.shape[0], len(self.classes_)), -np.inf)
        with np.errstate(divide="ignore"):  # columns of the class indices seen in training
            log_proba[:, self.estimator_.classes_] = np.log(self.estimator_.predict_proba(self._standardize(X)))
        if mask is not None:
            log_proba[~mask] = -np.inf
        return log_proba

    linear_weights = LinearChip.linear_weights

    def state_tensors(self) -> dict[str, np.ndarray]:
        """:data:`STATE_KEYS` ``["logreg"]``: coefficients and intercept on standardized features,
        ``mean`` / ``scale``, the class indices seen in training and the solver's iterations."""
        check_is_fitted(self)
        return {"coef": np.asarray(self.estimator_.coef_), "intercept": np.asarray(self.estimator_.intercept_),
                "mean": np.asarray(self.mean_), "scale": np.asarray(self.scale_),
                "seen": np.asarray(self.estimator_.classes_, dtype=np.int64),
                "n_iter": np.asarray([self.n_iter_], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray], classes) -> LogRegChip:
        """Rebuild the ``LogisticRegression`` with exactly the saved arrays: it predicts as the fitted one."""
        self.classes_ = np.asarray(classes)
        self.mean_, self.scale_ = np.asarray(state["mean"]), np.asarray(state["scale"])
        self.n_features_in_ = int(self.mean_.shape[0])
        self.estimator_ = estimator = self._estimator()
        estimator.coef_, estimator.intercept_ = np.asarray(state["coef"]), np.asarray(state["intercept"])
        estimator.classes_ = np.asarray(state["seen"], dtype=np.int64)
        estimator.n_features_in_ = self.n_features_in_
        estimator.n_iter_ = np.asarray(state["n_iter"], dtype=np.int64).reshape(-1)
        self.coef_, self.intercept_ = estimator.coef_, estimator.intercept_
        self.n_iter_ = int(np.max(estimator.n_iter_))
        return self


def _seed(random_state) -> int:
    """An int random_state is the seed itself (so the bank trainer can use it too)."""
    if isinstance(random_state, (int, np.integer)):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


#: The class of each chip kind.
CHIP_CLASSES = {"linear": LinearChip, "mlp": MLPChip, "logreg": LogRegChip}


def make_chip(kind: str, **params) -> _ChipBase:
    """A new (unfitted) chip of ``kind`` ("linear", "mlp" or "logreg") with ``params``."""
    if kind not in CHIP_CLASSES:
        raise ValueError(f"unknown chip {kind!r}; choose one of {CHIP_KINDS}")
    return CHIP_CLASSES[kind](**params)


__all__ = ["CHIP_CLASSES", "CHIP_KINDS", "STATE_KEYS", "LinearChip", "LogRegChip", "MLPChip", "make_chip"]
