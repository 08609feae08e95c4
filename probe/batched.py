"""The batched computation: the chips of many layers (and settings) as one set of tensors.

Every chip of a group of G layers is a slice ``[g]`` of stacked tensors, so one ``torch.bmm``
runs all of them on the same minibatch:

    linear:  logits = W x + b                     W (G, C, H), b (G, C)
    mlp:     logits = W1 relu(W2 x + b2) + b1      W2 (G, D, H), b2 (G, D), W1 (G, C, D), b1 (G, C)

with ``x`` (G, B, H): row b's feature at each of the G layers. Weights are (out, in) as in
``torch.nn.Linear``, and the products are taken as ``W @ x^T``: for a handful of classes that
layout is several times faster on CPU than ``x @ W`` (the weight gradient becomes a short-wide
product instead of a tall-skinny one). The loss is the sum over chips of
each chip's mean cross-entropy; the chips share no parameters, and AdamW acts elementwise, so a
chip trained in a group follows the same trajectory as the chip trained alone (same seed, same
minibatch order). Every chip starts from the same seeded initialisation whatever its group.

Settings that share a minibatch order (same batch size and seed) train together as "banks": one
set of stacked tensors and one optimizer per setting (learning rate, weight decay, chip type).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TORCH_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class ChipSpec:
    """Settings of one bank of torch chips (one chip per layer of the group).

    Attributes:
        kind: "linear" or "mlp".
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay, applied to every parameter as torch does.
        betas: AdamW betas.
        eps: AdamW epsilon.
        epochs: most passes over the training rows.
        hidden: MLP hidden width (ignored for linear).
        early_stopping: keep each chip's state of lowest validation loss and stop it after
            ``n_iter_no_change`` epochs without an improvement larger than ``tol``.
        n_iter_no_change: patience, in epochs.
        tol: smallest validation-loss improvement that counts.
        fit_intercept: learn the output bias ``b``; False keeps it at zero (a bias-free chip).
        lr_decay: the learning rate is multiplied by this after every epoch (the same schedule
            for every chip, so chips stay independent); 1 keeps it constant.
    """

    kind: str = "linear"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 30
    hidden: int = 256
    early_stopping: bool = True
    n_iter_no_change: int = 3
    tol: float = 1e-4
    fit_intercept: bool = True
    lr_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TORCH_KINDS:
            raise ValueError(f"kind must be one of {TORCH_KINDS}, got {self.kind!r}")


def param_shapes(kind: str, n_features: int, n_classes: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one chip's tensors (without the leading chip axis), (out, in) like nn.Linear."""
    if kind == "linear":
        return {"weight": (n_classes, n_features), "bias": (n_classes,)}
    return {
        "weight_hidden": (hidden, n_features),
        "bias_hidden": (hidden,),
        "weight": (n_classes, hidden),
        "bias": (n_classes,),
    }


def init_params(spec: ChipSpec, n_chips: int, n_features: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded initialisation, identical for every chip (so a chip does not depend on its group).

    Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, as ``torch.nn.Linear``.

    Returns:
        name -> float32 tensor (n_chips, *shape), requiring grad.
    """
    gen = torch.Generator().manual_seed(int(seed))
    params = {}
    for name, shape in param_shapes(spec.kind, n_features, n_classes, spec.hidden).items():
        fan_in = n_features if name.endswith("_hidden") or spec.kind == "linear" else spec.hidden
        bound = 1.0 / math.sqrt(fan_in)
        one = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        params[name] = one.expand(n_chips, *shape).clone().requires_grad_(True)
    return params


def chip_logits(kind: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of G chips on their layers' features.

    Args:
        kind: "linear" or "mlp".
        params: stacked tensors of :func:`param_shapes`, leading axis G.
        x: (G, B, H) standardized features.

    Returns:
        (G, B, C) logits.
    """
    xt = x.transpose(1, 2)  # (G, H, B), a view
    if kind == "linear":
        out = torch.baddbmm(params["bias"].unsqueeze(2), params["weight"], xt)  # (G, C, B)
        return out.transpose(1, 2)
    h = torch.relu(torch.baddbmm(params["bias_hidden"].unsqueeze(2), params["weight_hidden"], xt))  # (G, D, B)
    return torch.baddbmm(params["bias"].unsqueeze(2), params["weight"], h).transpose(1, 2)  # (G, B, C)


def mask_logits(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """Invalid classes get -inf: zero probability, never the argmax, no gradient.

    Args:
        logits: (..., B, C).
        class_mask: (B, C) bool, True where the class is valid; None for all valid.
    """
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask, float("-inf"))


def chip_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each chip: logits (G, B, C), y (B,) -> (G,)."""
    G, B, C = logits.shape
    per_row = F.cross_entropy(logits.reshape(G * B, C), y.repeat(G), reduction="none")
    return per_row.view(G, B).mean(dim=1)


@torch.no_grad()
def predict_logits(
    kind: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    class_mask: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Masked logits (G, N, C) of G chips on x (G, N, H), in row chunks to bound memory."""
    device = params["weight"].device
    parts = []
    for start in range(0, x.shape[1], chunk):
        xb = x[:, start:start + chunk].to(device)
        mb = None if class_mask is None else class_mask[start:start + chunk].to(device)
        parts.append(mask_logits(chip_logits(kind, params, xb), mb).cpu())
    if not parts:
        n_classes = params["bias"].shape[-1]
        return torch.empty(x.shape[0], 0, n_classes)
    return torch.cat(parts, dim=1)


def standardization(x: np.ndarray, standardize: bool = True, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of one layer's training features.

    Args:
        x: (N, H) features.
        standardize: False gives mean 0 and scale 1 (the chip sees raw features).
        center: False keeps mean 0 (scale only), so a folded linear chip stays bias-free.

    Returns:
        mean (H,), scale (H,) float32; a constant feature gets scale 1.
    """
    H = x.shape[1]
    if not standardize:
        return np.zeros(H, np.float32), np.ones(H, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if center:
        var, mean = torch.var_mean(t, dim=0, correction=0)  # Welford: no cancellation
    else:
        mean, var = torch.zeros(H), t.square().mean(dim=0)
    scale = var.sqrt()
    scale[scale < 1e-6] = 1.0
    return mean.numpy().astype(np.float32), scale.numpy().astype(np.float32)


class Batches(Protocol):
    """Training rows of a group of layers, served as standardized minibatches."""

    n_chips: int

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yields (rows (B,) positions in the training rows, x (G, B, H), y (B,), class_mask (B, C) | None)."""
        ...


class InMemoryBatches:
    """Minibatches of features held in memory, in a seeded order.

    Epoch e visits the rows in ``np.random.default_rng(seed)``'s e-th permutation (one generator
    drawn from epoch after epoch), so the order does not depend on the layers in the group.

    Args:
        x: (G, M, H) standardized features, contiguous (a gather from a strided view is ~100x
            slower); the training rows are ``x[:, rows]``.
        y: (N,) class indices of the training rows.
        class_mask: (N, C) bool or None.
        batch_size: rows per step.
        seed: order seed.
        shuffle: False visits the rows in order.
        rows: (N,) positions of the training rows in ``x`` (default all M).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None,
                 batch_size: int, seed: int, shuffle: bool = True, rows: np.ndarray | None = None) -> None:
        self.x, self.y, self.class_mask = x, y, class_mask
        self.rows = np.arange(x.shape[1]) if rows is None else np.asarray(rows)
        if len(self.rows) != len(y):
            raise ValueError(f"{len(self.rows)} training rows but {len(y)} labels")
        self.n_chips = x.shape[0]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._orders: list[np.ndarray] = []

    def order(self, epoch: int) -> np.ndarray:
        """Order of an epoch, as positions in the training rows (drawn in sequence, so epoch e
        always gets the same order)."""
        n = len(self.rows)
        while len(self._orders) <= epoch:
            self._orders.append(self._rng.permutation(n) if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def epoch(self, epoch: int):
        order = self.order(epoch)
        for start in range(0, len(order), self.batch_size):
            pos = order[start:start + self.batch_size]
            idx = torch.from_numpy(pos)
            mask = None if self.class_mask is None else self.class_mask[idx]
            xb = self.x.index_select(1, torch.from_numpy(self.rows[pos]))  # (G, B, H)
            yield pos, xb, self.y[idx], mask


def fit_banks(
    data: Batches,
    specs: list[ChipSpec],
    n_features: int,
    n_classes: int,
    *,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[int, int, np.ndarray], None] | None = None,
) -> list[dict]:
    """Train one bank of G chips per spec on the same minibatches.

    Args:
        data: the training minibatches (G layers).
        specs: one per bank; all banks see the same rows in the same order.
        n_features: H. n_classes: C.
        seed: initialisation seed (every chip starts from the same draw).
        val: (x (G, Nv, H), y (Nv,), class_mask (Nv, C) | None) for early stopping; None
            disables it (each chip keeps its last state).
        device: where the chips train.
        callback: called as ``callback(epoch, step, rows)`` after every step (tests, progress).

    Returns:
        Per spec: {"params": name -> (G, ...) float32 tensor (best state), "best_epoch": (G,) int,
        "epochs_run": epochs the bank ran, "chip_epochs": (G,) epochs until each chip stopped,
        "val_loss": (G,) validation loss of the kept state or None}.
    """
    device = torch.device(device)
    banks = []
    for spec in specs:
        params = {k: v.detach().to(device).requires_grad_(True)
                  for k, v in init_params(spec, data.n_chips, n_features, n_classes, seed).items()}
        if not spec.fit_intercept:
            params["bias"] = params["bias"].detach().zero_()  # a constant zero, never trained
        trained = [v for k, v in params.items() if k != "bias" or spec.fit_intercept]
        optimizer = torch.optim.AdamW(trained, lr=spec.lr, betas=spec.betas,
                                      eps=spec.eps, weight_decay=spec.weight_decay)
        banks.append({
            "spec": spec, "params": params, "optimizer": optimizer,
            "best": {k: v.detach().clone() for k, v in params.items()},
            "best_loss": torch.full((data.n_chips,), float("inf")),
            "best_epoch": torch.zeros(data.n_chips, dtype=torch.long),
            "bad": torch.zeros(data.n_chips, dtype=torch.long),
            "done": torch.zeros(data.n_chips, dtype=torch.bool),
            "stopped": torch.zeros(data.n_chips, dtype=torch.long),  # epochs each chip trained
            "epochs_run": 0,
            "early": spec.early_stopping and val is not None,
        })
    step = 0
    for epoch in range(max(spec.epochs for spec in specs)):
        active = [b for b in banks if not bool(b["done"].all()) and epoch < b["spec"].epochs]
        if not active:
            break
        for rows, xb, yb, mb in data.epoch(epoch):
            xb, yb = xb.to(device), yb.to(device)
            mb = None if mb is None else mb.to(device)
            for bank in active:
                logits = mask_logits(chip_logits(bank["spec"].kind, bank["params"], xb), mb)  # (G, B, C)
                loss = chip_losses(logits, yb).sum()
                bank["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                bank["optimizer"].step()
            if callback is not None:
                callback(epoch, step, rows)
            step += 1
        for bank in active:
            bank["epochs_run"] = epoch + 1
            for group in bank["optimizer"].param_groups:
                group["lr"] *= bank["spec"].lr_decay
            live = ~bank["done"]
            if bank["early"]:
                _early_stopping_update(bank, val, epoch)
            if epoch + 1 >= bank["spec"].epochs:
                bank["done"][:] = True
            bank["stopped"] = torch.where(live & bank["done"], torch.full_like(bank["stopped"], epoch + 1),
                                          bank["stopped"])
    results = []
    for bank in banks:
        if bank["early"]:
            params, val_loss = bank["best"], bank["best_loss"]
        else:
            params = {k: v.detach().clone() for k, v in bank["params"].items()}
            val_loss = None
            bank["best_epoch"][:] = bank["epochs_run"] - 1
        results.append({
            "params": {k: v.cpu() for k, v in params.items()},
            "best_epoch": bank["best_epoch"].numpy().copy(),
            "epochs_run": bank["epochs_run"],
            "chip_epochs": torch.where(bank["stopped"] > 0, bank["stopped"],
                                       torch.full_like(bank["stopped"], bank["epochs_run"])).numpy(),
            "val_loss": None if val_loss is None else val_loss.numpy().copy(),
        })
    return results


def _early_stopping_update(bank: dict, val, epoch: int) -> None:
    """Snapshot the chips whose validation loss improved; retire the ones out of patience.

    A retired chip keeps training with its bank (its parameters are not shared), but its best
    state is frozen, so it ends where it would have stopped alone.
    """
    spec: ChipSpec = bank["spec"]
    x_val, y_val, m_val = val
    logits = predict_logits(spec.kind, bank["params"], x_val, m_val)  # (G, Nv, C)
    losses = chip_losses(logits, y_val)  # (G,)
    live = ~bank["done"]
    improved = (losses < bank["best_loss"] - spec.tol) & live
    for name, value in bank["params"].items():
        keep = improved.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        bank["best"][name] = torch.where(keep, value.detach(), bank["best"][name])
    bank["best_loss"] = torch.where(improved, losses, bank["best_loss"])
    bank["best_epoch"] = torch.where(improved, torch.full_like(bank["best_epoch"], epoch), bank["best_epoch"])
    bank["bad"] = torch.where(improved, torch.zeros_like(bank["bad"]), bank["bad"] + live.long())
    bank["done"] |= bank["bad"] >= spec.n_iter_no_change
