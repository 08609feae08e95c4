"""Chips: scikit-learn-compatible classifiers on one layer's features.

* :class:`LinearChip` -- ``softmax(W x + b)`` in torch;
* :class:`MLPChip` -- ``W1 ReLU(W2 x + b2) + b1`` in torch (hidden 256 by default);
* :class:`LogRegChip` -- scikit-learn's ``LogisticRegression`` (the second backend).

All three standardize each feature with statistics of their training rows (saved with the chip as
``mean_`` / ``scale_``) and take an optional ``class_mask`` keyword, (N, C) bool, True where a
class is valid for that row (C3 rows have 2 to 4 options): a masked class gets zero probability
and is never predicted; the torch chips also leave it out of the training loss.

The torch chips train with the same code as a bank of chips (:mod:`chiptuning.probe.bank`),
with one chip in the group.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from chiptuning.probe.bank import ChipSpec, fit_banks, predict_logits, resolve_precision
from chiptuning.probe.data import InMemoryBatches, as_class_mask, split_validation, standardization, standardize_into

CHIP_KINDS = ("linear", "mlp", "logreg")
#: The arrays each chip kind saves (:meth:`state_tensors`), all it needs to predict: stored in
#: safetensors, never as a pickle.
STATE_KEYS = {
    "linear": ("weight", "bias", "mean", "scale"),
    "mlp": ("weight_hidden", "bias_hidden", "weight", "bias", "mean", "scale"),
    "logreg": ("coef", "intercept", "mean", "scale", "seen", "n_iter"),
}


def _seed(random_state) -> int:
    """An int random_state is the seed itself (so the bank trainer can use it too)."""
    if isinstance(random_state, (int, np.integer)):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class _ChipBase(ClassifierMixin, BaseEstimator):
    """What every chip shares: label encoding, standardization, masking, predict / score."""

    def _encode_fit(self, X, y, class_mask):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if self.classes is not None:
            self.classes_ = np.asarray(self.classes)
            unknown = np.setdiff1d(np.unique(y), self.classes_)
            if unknown.size:
                raise ValueError(f"labels {unknown.tolist()} are not in classes={self.classes_.tolist()}")
        else:
            self.classes_ = np.unique(y)
        y_idx = np.searchsorted(self.classes_, y)
        mask = as_class_mask(class_mask, len(y), len(self.classes_))
        if mask is not None and not mask[np.arange(len(y)), y_idx].all():
            raise ValueError("class_mask marks the true class of some row as invalid")
        return X, y_idx.astype(np.int64), mask

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def _masked_scores(self, X, class_mask) -> np.ndarray:
        """(N, C) masked logits (torch chips) or log-probabilities (logreg)."""
        raise NotImplementedError

    def decision_function(self, X, class_mask=None) -> np.ndarray:
        """Logits, (N, C); for two classes the logit difference, (N,), as scikit-learn does.

        Masked classes are -inf.
        """
        scores = self._masked_scores(X, class_mask)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X, class_mask=None) -> np.ndarray:
        """Class probabilities (N, C), columns in ``classes_`` order; masked classes get 0."""
        scores = torch.from_numpy(np.asarray(self._masked_scores(X, class_mask), dtype=np.float64))
        return torch.softmax(scores, dim=1).numpy()

    def predict(self, X, class_mask=None) -> np.ndarray:
        """Predicted labels (N,); a masked class is never predicted."""
        scores = self._masked_scores(X, class_mask)
        return self.classes_[np.argmax(scores, axis=1)]

    def score(self, X, y, sample_weight=None, class_mask=None) -> float:
        """Accuracy (with the class mask applied when given)."""
        pred = self.predict(X, class_mask=class_mask)
        return float(np.average(pred == np.asarray(y), weights=sample_weight))

    def _check_predict_input(self, X, class_mask):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return X, as_class_mask(class_mask, X.shape[0], len(self.classes_))


class _TorchChip(_ChipBase):
    """A torch chip: a bank of one layer and one setting."""

    _kind = "linear"

    def _store(self, lr, weight_decay, epochs, batch_size, betas, standardize, early_stopping, validation_fraction,
               n_iter_no_change, min_patience_steps, tol, shuffle, classes, random_state, device, verbose,
               precision) -> None:
        """Store the parameters both torch chips take, unchanged (the scikit-learn contract)."""
        self.lr, self.weight_decay, self.epochs, self.batch_size = lr, weight_decay, epochs, batch_size
        self.betas, self.standardize, self.early_stopping = betas, standardize, early_stopping
        self.validation_fraction, self.n_iter_no_change = validation_fraction, n_iter_no_change
        self.min_patience_steps, self.tol, self.shuffle, self.classes = min_patience_steps, tol, shuffle, classes
        self.random_state, self.device, self.verbose, self.precision = random_state, device, verbose, precision

    def _spec(self) -> ChipSpec:
        return ChipSpec(
            kind=self._kind, lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas),
            eps=1e-8, epochs=self.epochs, hidden=getattr(self, "hidden", 256),
            early_stopping=self.early_stopping, n_iter_no_change=self.n_iter_no_change,
            min_patience_steps=getattr(self, "min_patience_steps", 0), tol=self.tol,
            fit_intercept=getattr(self, "fit_intercept", True),
            precision=resolve_precision(self.precision, self.device),
        )

    def fit(self, X, y, class_mask=None):
        """Train the chip.

        Args:
            X: (N, H) features of one layer.
            y: (N,) labels.
            class_mask: optional (N, C) bool, True where a class is valid (columns in
                ``classes_`` order); masked classes are left out of the loss.

        Returns:
            self.
        """
        X, y_idx, mask = self._encode_fit(X, y, class_mask)
        seed = _seed(self.random_state)
        n, H = X.shape
        C = len(self.classes_)
        train_rows, val_rows = np.arange(n), None
        if self.early_stopping:
            n_val = max(1, int(round(self.validation_fraction * n)))
            if n_val >= n:
                raise ValueError(f"validation_fraction={self.validation_fraction} leaves no training rows")
            train_rows, val_rows = split_validation(n, n_val, seed)
        spec = self._spec()
        self.mean_, self.scale_ = standardization(X, self.standardize, rows=train_rows,
                                                  center=getattr(self, "fit_intercept", True))
        y_t = torch.from_numpy(y_idx)
        m_t = None if mask is None else torch.from_numpy(mask)

        def part(rows, dtype):
            # x: (1, n, H), standardized exactly as the bank trainer does (float32, then dtype)
            x = standardize_into(X, self.mean_, self.scale_, torch.empty((len(rows), H), dtype=dtype), rows=rows)
            idx = torch.from_numpy(rows)
            return x.unsqueeze(0), y_t[idx], None if m_t is None else m_t[idx]

        x_tr, y_tr, m_tr = part(train_rows, torch.bfloat16 if spec.precision == "bfloat16" else torch.float32)
        val = None if val_rows is None else part(val_rows, torch.float32)
        data = InMemoryBatches(x_tr, y_tr, m_tr, self.batch_size, seed, shuffle=self.shuffle)
        result = fit_banks(data, [spec], H, C, seed=seed, val=val, device=self.device)[0]
        self._set_params({k: v[0].numpy() for k, v in result["params"].items()})
        self.n_iter_ = int(result["epochs_run"])
        self.best_epoch_ = int(result["best_epoch"][0])
        return self

    def _params_tensors(self) -> dict[str, torch.Tensor]:
        """This chip's tensors in the bank layout, with a chip axis of 1."""
        raise NotImplementedError

    def _masked_scores(self, X, class_mask) -> np.ndarray:
        X, mask = self._check_predict_input(X, class_mask)
        x = torch.from_numpy(self._standardize(X)).unsqueeze(0)  # (1, N, H)
        m = None if mask is None else torch.from_numpy(mask)
        params = {k: v.to(self.device) for k, v in self._params_tensors().items()}
        return predict_logits(self._kind, params, x, m)[0].numpy()  # (N, C)

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Learned arrays in the bank layout (see :func:`~chiptuning.probe.bank.param_shapes`)
        plus ``mean`` and ``scale``: what is saved."""
        check_is_fitted(self)
        out = {k: v[0].numpy() for k, v in self._params_tensors().items()}
        out["mean"], out["scale"] = self.mean_, self.scale_
        return out

    def load_state(self, state: dict[str, np.ndarray], classes) -> _TorchChip:
        """Set the learned state from :meth:`state_tensors` arrays (used when loading)."""
        self.classes_ = np.asarray(classes)
        self.mean_ = np.asarray(state["mean"], dtype=np.float32)
        self.scale_ = np.asarray(state["scale"], dtype=np.float32)
        self.n_features_in_ = int(self.mean_.shape[0])
        self._set_params({k: np.asarray(v, dtype=np.float32) for k, v in state.items()
                          if k not in ("mean", "scale")})
        return self

    def _set_params(self, params: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


_TORCH_DOC_ARGS = """
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay (the regularization).
        epochs: most passes over the training rows.
        batch_size: rows per optimizer step.
        betas: AdamW betas.
        standardize: standardize each feature with the training rows' mean and std (saved).
        early_stopping: hold out ``validation_fraction`` of the rows (seeded) and keep the state of
            lowest validation loss; stop after ``n_iter_no_change`` epochs without improvement.
        validation_fraction: share of rows held out for early stopping.
        n_iter_no_change: patience in epochs.
        min_patience_steps: the patience is never shorter than this many optimizer steps.
        tol: smallest validation-loss improvement that counts.
        shuffle: shuffle the rows every epoch (seeded).
        classes: every class label, in order (default the labels seen in ``y``); pass it when a
            class may be missing from the training rows.
        random_state: seed of the initialisation, the row order and the validation split.
        device: torch device to train on.
        verbose: unused by the torch chips (logging is configured by the caller); kept for the
            scikit-learn convention.
        precision: "auto", "float32" or "bfloat16": precision of the products with the features
            in training ("auto": bfloat16 on CPUs with AMX / AVX512-BF16, else float32);
            prediction is always float32.
"""


class LinearChip(_TorchChip):
    __doc__ = """Linear chip ``softmax(W x + b)`` trained with AdamW on standardized features.

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_`` (H,), ``coef_`` (C, H)
    and ``intercept_`` (C,) on standardized features (``linear_weights()`` folds the
    standardization into raw-feature weights), ``n_iter_``, ``best_epoch_``.

    Args:""" + _TORCH_DOC_ARGS + """        fit_intercept: learn ``b``; without it features are only scaled (not centered) so the
            folded chip is bias-free.
    """

    _kind = "linear"

    def __init__(self, *, lr: float = 1e-3, weight_decay: float = 1e-2, epochs: int = 30,
                 batch_size: int = 128, betas: tuple[float, float] = (0.9, 0.999),
                 standardize: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 3, min_patience_steps: int = 0,
                 tol: float = 1e-4,
                 shuffle: bool = True, fit_intercept: bool = True, classes=None, random_state=None,
                 device: str = "cpu", verbose: int = 0, precision: str = "auto") -> None:
        self.fit_intercept = fit_intercept
        self._store(lr, weight_decay, epochs, batch_size, betas, standardize, early_stopping, validation_fraction,
                    n_iter_no_change, min_patience_steps, tol, shuffle, classes, random_state, device, verbose,
                    precision)

    def _set_params(self, params):
        self.coef_ = params["weight"].copy()  # (C, H)
        self.intercept_ = params["bias"].copy()  # (C,)

    def _params_tensors(self):
        return {"weight": torch.from_numpy(np.ascontiguousarray(self.coef_)).unsqueeze(0),
                "bias": torch.from_numpy(self.intercept_).unsqueeze(0)}

    def linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W (C, H), b (C,)) acting on raw features: the standardization folded in."""
        check_is_fitted(self)
        weight = self.coef_ / self.scale_[None, :]
        return weight, self.intercept_ - weight @ self.mean_


class MLPChip(_TorchChip):
    __doc__ = """Two-layer MLP chip ``W1 ReLU(W2 x + b2) + b1`` trained with AdamW.

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_`` (H,), ``coefs_`` =
    [W2 (H, D), W1 (D, C)] and ``intercepts_`` = [b2 (D,), b1 (C,)] (scikit-learn's MLP layout),
    ``n_iter_``, ``best_epoch_``.

    Args:
        hidden: hidden width D.""" + _TORCH_DOC_ARGS

    _kind = "mlp"

    def __init__(self, *, hidden: int = 256, lr: float = 1e-3, weight_decay: float = 1e-2,
                 epochs: int = 30, batch_size: int = 128, betas: tuple[float, float] = (0.9, 0.999),
                 standardize: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 3, min_patience_steps: int = 0,
                 tol: float = 1e-4,
                 shuffle: bool = True, classes=None, random_state=None, device: str = "cpu",
                 verbose: int = 0, precision: str = "auto") -> None:
        self.hidden = hidden
        self._store(lr, weight_decay, epochs, batch_size, betas, standardize, early_stopping, validation_fraction,
                    n_iter_no_change, min_patience_steps, tol, shuffle, classes, random_state, device, verbose,
                    precision)

    def _set_params(self, params):
        # scikit-learn's MLP layout is (in, out); the bank's is (out, in).
        self.coefs_ = [np.ascontiguousarray(params["weight_hidden"].T), np.ascontiguousarray(params["weight"].T)]
        self.intercepts_ = [params["bias_hidden"].copy(), params["bias"].copy()]  # (D,), (C,)

    def _params_tensors(self):
        names = (("weight_hidden", self.coefs_[0].T), ("bias_hidden", self.intercepts_[0]),
                 ("weight", self.coefs_[1].T), ("bias", self.intercepts_[1]))
        return {k: torch.from_numpy(np.ascontiguousarray(v)).unsqueeze(0) for k, v in names}


class LogRegChip(_ChipBase):
    """scikit-learn ``LogisticRegression`` on standardized features, with class masking.

    The mask acts at prediction only (scikit-learn's loss has no per-row class mask).

    Learned state: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_``, ``estimator_`` (the
    fitted ``LogisticRegression``), ``coef_`` / ``intercept_`` (its arrays, on standardized
    features; ``linear_weights()`` folds the standardization). It is a linear model: it saves as
    those arrays (:meth:`state_tensors`) and :meth:`load_state` rebuilds the estimator from them,
    predicting exactly as before (no pickle).

    Args:
        C: inverse regularization strength.
        max_iter: most solver iterations.
        tol: solver tolerance.
        standardize: standardize each feature with the training rows' statistics (saved).
        classes: every class label, in order (default the labels seen in ``y``).
        random_state: passed to ``LogisticRegression``.
        verbose: passed to ``LogisticRegression``.
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                 standardize: bool = True, classes=None, random_state=None, verbose: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.classes = classes
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, class_mask=None):
        """Fit on (N, H) features and (N,) labels; ``class_mask`` is checked, used at prediction."""
        X, y_idx, _ = self._encode_fit(X, y, class_mask)
        self.mean_, self.scale_ = standardization(X, self.standardize)
        self.estimator_ = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol,
                                             random_state=self.random_state, verbose=self.verbose)
        self.estimator_.fit(self._standardize(X), y_idx)
        self.coef_, self.intercept_ = self.estimator_.coef_, self.estimator_.intercept_
        self.n_iter_ = int(np.max(self.estimator_.n_iter_))
        return self

    def _masked_scores(self, X, class_mask) -> np.ndarray:
        X, mask = self._check_predict_input(X, class_mask)
        C = len(self.classes_)
        log_proba = np.full((X.shape[0], C), -np.inf)
        seen = self.estimator_.classes_  # class indices present in the training rows
        with np.errstate(divide="ignore"):
            log_proba[:, seen] = np.log(self.estimator_.predict_proba(self._standardize(X)))
        if mask is not None:
            log_proba[~mask] = -np.inf
        return log_proba

    def linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) acting on raw features (the standardization folded in); scikit-learn's shapes."""
        check_is_fitted(self)
        weight = self.coef_ / self.scale_[None, :]
        return weight, self.intercept_ - weight @ self.mean_

    def state_tensors(self) -> dict[str, np.ndarray]:
        """The learned arrays (:data:`STATE_KEYS` ``["logreg"]``): coefficients and intercept on
        standardized features, ``mean`` / ``scale``, the class indices seen in training (``seen``,
        the estimator's ``classes_``) and the solver's iterations, in their own dtypes."""
        check_is_fitted(self)
        return {"coef": np.asarray(self.estimator_.coef_), "intercept": np.asarray(self.estimator_.intercept_),
                "mean": np.asarray(self.mean_), "scale": np.asarray(self.scale_),
                "seen": np.asarray(self.estimator_.classes_, dtype=np.int64),
                "n_iter": np.asarray([self.n_iter_], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray], classes) -> LogRegChip:
        """Set the learned state from :meth:`state_tensors` arrays: the ``LogisticRegression`` is
        rebuilt with exactly those arrays, so it predicts what the fitted one did."""
        self.classes_ = np.asarray(classes)
        self.mean_ = np.asarray(state["mean"])
        self.scale_ = np.asarray(state["scale"])
        self.n_features_in_ = int(self.mean_.shape[0])
        estimator = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol,
                                       random_state=self.random_state, verbose=self.verbose)
        estimator.coef_ = np.asarray(state["coef"])
        estimator.intercept_ = np.asarray(state["intercept"])
        estimator.classes_ = np.asarray(state["seen"], dtype=np.int64)
        estimator.n_features_in_ = self.n_features_in_
        estimator.n_iter_ = np.asarray(state["n_iter"], dtype=np.int64).reshape(-1)
        self.estimator_ = estimator
        self.coef_, self.intercept_ = estimator.coef_, estimator.intercept_
        self.n_iter_ = int(np.max(estimator.n_iter_))
        return self


def make_chip(kind: str, **params) -> _ChipBase:
    """A new (unfitted) chip of ``kind`` ("linear", "mlp" or "logreg") with ``params``."""
    classes = {"linear": LinearChip, "mlp": MLPChip, "logreg": LogRegChip}
    if kind not in classes:
        raise ValueError(f"unknown chip {kind!r}; choose one of {CHIP_KINDS}")
    return classes[kind](**params)


__all__ = [
    "CHIP_KINDS",
    "STATE_KEYS",
    "LinearChip",
    "LogRegChip",
    "MLPChip",
    "make_chip",
]
