"""The batched computation: the chips of many layers and settings as one set of tensors.

A *bank* holds the chips of G layers x S settings that share everything but their weight decay
(chip type, learning rate, betas, epochs, precision, ...). Its tensors carry two leading axes,
``[g, s]``, and the first layer of every chip of a layer is one matrix product:

    linear:  logits = W x + b                     W (G, S, C, H), b (G, S, C)
    mlp:     logits = W1 relu(W2 x + b2) + b1      W2 (G, S, D, H), b2 (G, S, D),
                                                   W1 (G, S, C, D), b1 (G, S, C)

with ``x`` (G, B, H): row b's feature at each of the G layers. ``W`` is viewed as (G, S*C, H)
(or ``W2`` as (G, S*D, H)), so one ``torch.bmm`` per step runs every chip of the bank: the
features are read once per step whatever the number of settings. Weights are (out, in) as in
``torch.nn.Linear``. The loss is the sum over chips of each chip's mean cross-entropy; the chips
share no parameters and AdamW acts elementwise (the per-setting weight decay is applied as
AdamW's decoupled ``p *= 1 - lr * wd``), so a chip trained in a bank follows the same trajectory
as the chip trained alone (same seed, same minibatch order). Every chip starts from the same
seeded initialisation whatever its bank.

A training step is written by hand (:func:`_step`): the forward products, the cross-entropy's
gradient ``(softmax - one_hot) / B`` and the backward products go into buffers reused from step
to step, and the gradients into the parameters' ``.grad`` for :class:`AdamW` (torch's AdamW
update). It computes what autograd computes for :func:`bank_logits` + :func:`bank_losses` (a test checks it), without
building a graph or allocating tens of MB per step (page faults cost more than the arithmetic on
a CPU). Layers are stepped in slices of :data:`STEP_WEIGHTS` first-layer weights.

Precision: ``float32``, or ``bfloat16`` for the products with the features (the big ones): the
features are held in bfloat16 and the weights cast per step, while the master weights, the
optimizer, the loss and the MLP's small second layer stay float32. On CPUs with AMX or
AVX512-BF16 that product is several times faster than float32; ``"auto"`` picks bfloat16 there
and float32 elsewhere. Validation (early stopping) always runs in float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TORCH_KINDS = ("linear", "mlp")
PRECISIONS = ("auto", "float32", "bfloat16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """"float32" or "bfloat16"; "auto" is bfloat16 on a CPU with AMX / AVX512-BF16, else float32."""
    if precision in _DTYPES:
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cpu":
        return "float32"
    fast = False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        fast = fast or bool(check is not None and check())
    return "bfloat16" if fast else "float32"


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
        min_patience_steps: the patience is never shorter than this many optimizer steps
            (``ceil(min_patience_steps / steps per epoch)`` epochs when that is more): on a small
            cache an epoch is a handful of steps, and a 200-row validation loss is too noisy to
            call a plateau after a few dozen of them.
        tol: smallest validation-loss improvement that counts.
        fit_intercept: learn the output bias ``b``; False keeps it at zero (a bias-free chip).
        lr_decay: the learning rate is multiplied by this after every epoch (the same schedule
            for every chip, so chips stay independent); 1 keeps it constant.
        precision: "float32" or "bfloat16" (of the products with the features; see the module).
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
    min_patience_steps: int = 0
    tol: float = 1e-4
    fit_intercept: bool = True
    lr_decay: float = 1.0
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in TORCH_KINDS:
            raise ValueError(f"kind must be one of {TORCH_KINDS}, got {self.kind!r}")
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be float32 or bfloat16 (resolve 'auto' first), got {self.precision!r}")

    def bank_key(self) -> tuple:
        """Specs with the same key train as one bank (they may differ in weight decay only)."""
        return (self.kind, self.lr, tuple(self.betas), self.eps, self.epochs, self.hidden, self.early_stopping,
                self.n_iter_no_change, self.min_patience_steps, self.tol, self.fit_intercept, self.lr_decay,
                self.precision)


def param_shapes(kind: str, n_features: int, n_classes: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one chip's tensors (without the leading chip axes), (out, in) like nn.Linear."""
    if kind == "linear":
        return {"weight": (n_classes, n_features), "bias": (n_classes,)}
    return {
        "weight_hidden": (hidden, n_features),
        "bias_hidden": (hidden,),
        "weight": (n_classes, hidden),
        "bias": (n_classes,),
    }


def _init_one(spec: ChipSpec, n_features: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    params = {}
    for name, shape in param_shapes(spec.kind, n_features, n_classes, spec.hidden).items():
        fan_in = n_features if name.endswith("_hidden") or spec.kind == "linear" else spec.hidden
        bound = 1.0 / math.sqrt(fan_in)
        params[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return params


def init_params(spec: ChipSpec, n_chips: int, n_features: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded initialisation, identical for every chip (so a chip does not depend on its group).

    Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, as ``torch.nn.Linear``.

    Returns:
        name -> float32 tensor (n_chips, *shape), requiring grad.
    """
    return {name: one.expand(n_chips, *one.shape).clone().requires_grad_(True)
            for name, one in _init_one(spec, n_features, n_classes, seed).items()}


def bank_logits(kind: str, params: dict[str, torch.Tensor], x: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of a bank of G x S chips on their layers' features.

    Args:
        kind: "linear" or "mlp".
        params: tensors of :func:`param_shapes` with leading axes (G, S).
        x: (G, B, H) standardized features, already in ``dtype``.
        dtype: precision of the product with the features.

    Returns:
        (G, S, C, B) float32 logits.
    """
    first = params["weight" if kind == "linear" else "weight_hidden"]
    bias = params["bias" if kind == "linear" else "bias_hidden"]
    G, S, D, H = first.shape
    xt = x.transpose(1, 2)  # (G, H, B), a view
    if dtype == torch.float32:
        z = torch.baddbmm(bias.reshape(G, S * D, 1), first.reshape(G, S * D, H), xt)  # (G, S*O, B)
    else:
        z = torch.bmm(first.reshape(G, S * D, H).to(dtype), xt).float().add_(bias.reshape(G, S * D, 1))
    if kind == "linear":
        return z.view(G, S, D, -1)
    h = torch.relu_(z).view(G * S, D, -1)  # (G*S, D, B); in place (autograd-safe: nothing saved z)
    C = params["weight"].shape[2]
    out = torch.baddbmm(params["bias"].reshape(G * S, C, 1), params["weight"].reshape(G * S, C, D), h)
    return out.view(G, S, C, -1)


def bank_losses(logits: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each chip: logits (G, S, C, B), y (B,) -> (G, S).

    Invalid classes (``class_mask`` (B, C) False) get -inf logits: no probability, no gradient.
    """
    G, S, C, B = logits.shape
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask.t(), float("-inf"))
    per_row = F.cross_entropy(logits.reshape(G * S, C, B), y.expand(G * S, B), reduction="none")
    return per_row.view(G, S, B).mean(dim=2)


def mask_logits(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """Invalid classes get -inf: zero probability, never the argmax, no gradient.

    Args:
        logits: (..., B, C).
        class_mask: (B, C) bool, True where the class is valid; None for all valid.
    """
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask, float("-inf"))


@torch.no_grad()
def predict_bank(kind: str, params: dict[str, torch.Tensor], x: torch.Tensor,
                 class_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 chunk: int = 2048) -> torch.Tensor:
    """Masked logits (G, S, N, C) of a bank on x (G, N, H), in row chunks to bound memory.

    One layer at a time: a row chunk of one layer is contiguous, so the product reads it in
    place (a chunk of all G layers is a strided view that ``bmm`` would first copy).
    """
    name = "weight" if kind == "linear" else "weight_hidden"
    first = params[name]
    device = first.device
    G, S = first.shape[:2]
    C = params["bias"].shape[-1]
    N = x.shape[1]
    out = torch.empty(G, S, N, C)
    if dtype != torch.float32:
        params = dict(params, **{name: first.to(dtype)})  # cast once, not per chunk
    for g in range(G):
        one = {k: v[g:g + 1] for k, v in params.items()}
        for start in range(0, N, chunk):
            # (1, b, H) with its own strides: bmm copies a view whose layer stride is N * H
            xb = x[g, start:start + chunk].to(device=device, dtype=dtype).contiguous().unsqueeze(0)
            logits = bank_logits(kind, one, xb, dtype)[0].transpose(1, 2)  # (S, b, C)
            mb = None if class_mask is None else class_mask[start:start + chunk].to(device)
            out[g, :, start:start + xb.shape[1]] = mask_logits(logits, mb).cpu()
    return out


def predict_logits(kind: str, params: dict[str, torch.Tensor], x: torch.Tensor,
                   class_mask: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Masked float32 logits (G, N, C) of G chips (one leading axis) on x (G, N, H)."""
    fused = {k: v.unsqueeze(1) for k, v in params.items()}
    return predict_bank(kind, fused, x, class_mask, chunk=chunk)[:, 0]


# -- standardization --------------------------------------------------------------------------------

_STATS_CHUNK = 256  # rows: a float32 chunk stays in cache across the passes over it (2048: ~1.5x slower)


def as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype == np.uint16:  # bfloat16 bit patterns (the cache's storage)
        return torch.from_numpy(np.ascontiguousarray(x)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float16 else np.float32))


def _chunks(t: torch.Tensor, rows: np.ndarray | None, buf: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 chunk of ``t[rows]``) by row chunks, gathered and decoded into reused
    buffers (fresh allocations cost page faults on every chunk)."""
    idx = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))
    n = t.shape[0] if idx is None else len(idx)
    gathered = None if idx is None else torch.empty((buf.shape[0], t.shape[1]), dtype=t.dtype)
    for start in range(0, n, _STATS_CHUNK):
        if idx is None:
            src = t[start:start + _STATS_CHUNK]
        else:
            part = idx[start:start + _STATS_CHUNK]
            src = torch.index_select(t, 0, part, out=gathered[:len(part)])
        chunk = buf[:src.shape[0]]
        chunk.copy_(src)
        yield start, chunk


class RunningStats:
    """Per-feature mean and variance merged chunk by chunk (Chan et al.), in float64.

    Each chunk is centered on its own mean before squaring (no cancellation when a feature's
    mean dwarfs its spread). The result depends only on the values and the chunking, not on
    their storage dtype: a bfloat16 array and its float32 decoding give identical statistics.
    """

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.mean = torch.zeros(n_features, dtype=torch.float64)
        self.m2 = torch.zeros(n_features, dtype=torch.float64)

    def update(self, chunk: torch.Tensor, center: bool = True) -> None:
        """Merge a (b, H) chunk; a float32 chunk is overwritten (used as scratch)."""
        b = chunk.shape[0]
        if b == 0:
            return
        f = chunk if chunk.dtype == torch.float32 else chunk.float()
        if center:
            mean = f.mean(dim=0)
            f.sub_(mean)
        else:
            mean = torch.zeros(f.shape[1])
        m2 = f.mul_(f).sum(dim=0).double()
        mean = mean.double()
        total = self.n + b
        delta = mean - self.mean
        self.mean += delta * (b / total)
        self.m2 += m2 + delta.square() * (self.n * b / total)
        self.n = total

    def remove(self, other: RunningStats) -> None:
        """Take out the rows merged into ``other`` (a subset of the rows merged here): the
        statistics of the remaining rows, without reading them again."""
        n = self.n - other.n
        if n <= 0:
            raise ValueError(f"cannot remove {other.n} of {self.n} rows")
        mean = (self.mean * self.n - other.mean * other.n) / n
        delta = other.mean - mean
        self.m2 = (self.m2 - other.m2 - delta.square() * (n * other.n / self.n)).clamp_min_(0)
        self.mean, self.n = mean, n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        scale = (self.m2 / max(self.n, 1)).sqrt()
        scale[scale < 1e-6] = 1.0
        return self.mean.float().numpy(), scale.float().numpy()


def standardization(x, standardize: bool = True, center: bool = True,
                    rows: np.ndarray | None = None, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of one layer's training features.

    Args:
        x: (N, H) features: float32 / float16 numpy, uint16 bfloat16 patterns, or a tensor.
        standardize: False gives mean 0 and scale 1 (the chip sees raw features).
        center: False keeps mean 0 (scale only), so a folded linear chip stays bias-free.
        rows: only these rows of ``x`` (default all).
        exclude: every row of ``x`` but these (instead of ``rows``): computed as all rows minus
            the excluded ones (:meth:`RunningStats.remove`), so the kept rows are never gathered.

    Returns:
        mean (H,), scale (H,) float32; a constant feature gets scale 1.
    """
    t = as_tensor(x)
    H = t.shape[1]
    if not standardize:
        return np.zeros(H, np.float32), np.ones(H, np.float32)
    if rows is not None and exclude is not None:
        raise ValueError("give rows or exclude, not both")
    stats = _running_stats(t, rows, center)
    if exclude is not None and len(exclude):
        stats.remove(_running_stats(t, exclude, center))
    mean, scale = stats.result()
    if not center:
        mean = np.zeros(H, np.float32)
    return mean, scale


def _running_stats(t: torch.Tensor, rows: np.ndarray | None, center: bool) -> RunningStats:
    stats = RunningStats(t.shape[1])
    n = t.shape[0] if rows is None else len(rows)
    buf = torch.empty((max(1, min(_STATS_CHUNK, n)), t.shape[1]), dtype=torch.float32)
    for _, chunk in _chunks(t, rows, buf):
        stats.update(chunk, center=center)
    return stats


def standardize_into(x, mean: np.ndarray, scale: np.ndarray, out: torch.Tensor,
                     rows: np.ndarray | None = None) -> torch.Tensor:
    """``out[i] = (x[rows[i]] - mean) / scale`` in float32, rounded to ``out``'s dtype, by chunks.

    Args:
        x: (N, H) features (see :func:`standardization`).
        mean, scale: (H,) float32.
        out: (len(rows), H) tensor (float32 or bfloat16).
        rows: rows of ``x`` (default all).
    """
    t = as_tensor(x)
    m, s = torch.from_numpy(np.asarray(mean, np.float32)), torch.from_numpy(np.asarray(scale, np.float32))
    buf = torch.empty((min(_STATS_CHUNK, max(out.shape[0], 1)), t.shape[1]), dtype=torch.float32)
    for start, chunk in _chunks(t, rows, buf):
        out[start:start + len(chunk)].copy_(chunk.sub_(m).div_(s))
    return out


def gather_standardized(x, out: torch.Tensor, rows: np.ndarray | None = None, standardize: bool = True,
                        center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Gather ``x[rows]`` into ``out`` (x's own dtype), then compute the statistics on ``out`` and
    standardize it in place: one gather of the stored values instead of one per pass.

    Gives what :func:`standardization` + :func:`standardize_into` give (the same values in the
    same chunks), for ``x`` already in ``out``'s dtype (e.g. a bfloat16 cache trained in bfloat16).

    Returns:
        mean (H,), scale (H,) float32.
    """
    t = as_tensor(x)
    if t.dtype != out.dtype:
        raise ValueError(f"gather_standardized needs x in out's dtype {out.dtype}, got {t.dtype}")
    if rows is None:
        out.copy_(t)
    else:
        torch.index_select(t, 0, torch.from_numpy(np.asarray(rows, dtype=np.int64)), out=out)
    mean, scale = standardization(out, standardize, center=center)
    if standardize:
        standardize_into(out, mean, scale, out)
    return mean, scale


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
        """Minibatches of an epoch. The yielded features live in a buffer reused by the next
        minibatch of the same size (a fresh (G, B, H) allocation per step costs page faults)."""
        order = self.order(epoch)
        G, H = self.x.shape[0], self.x.shape[2]
        buffers: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), self.batch_size):
            pos = order[start:start + self.batch_size]
            idx = torch.from_numpy(pos)
            mask = None if self.class_mask is None else self.class_mask[idx]
            src = torch.from_numpy(self.rows[pos])
            if len(pos) not in buffers:
                buffers[len(pos)] = torch.empty((G, len(pos), H), dtype=self.x.dtype, device=self.x.device)
            xb = buffers[len(pos)]
            for g in range(G):  # row gathers of one layer: contiguous source rows
                torch.index_select(self.x[g], 0, src, out=xb[g])
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
    """Train G chips per spec on the same minibatches; specs differing only in weight decay
    share one bank (one product with the features per step).

    Args:
        data: the training minibatches (G layers).
        specs: the settings; all see the same rows in the same order.
        n_features: H. n_classes: C.
        seed: initialisation seed (every chip starts from the same draw).
        val: (x (G, Nv, H), y (Nv,), class_mask (Nv, C) | None) for early stopping; None
            disables it (each chip keeps its last state).
        device: where the chips train.
        callback: called as ``callback(epoch, step, rows)`` after every step (tests, progress).

    Returns:
        Per spec, in order: {"params": name -> (G, ...) float32 tensor (kept state),
        "best_epoch": (G,) int, "epochs_run": epochs its bank ran, "chip_epochs": (G,) epochs
        until each chip stopped, "val_loss": (G,) validation loss of the kept state or None}.
    """
    device = torch.device(device)
    G = data.n_chips
    keys: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        keys.setdefault(spec.bank_key(), []).append(i)
    if val is not None:
        val = (val[0].to(device=device, dtype=torch.float32), val[1].to(device),
               None if val[2] is None else val[2].to(device))
    banks = []
    for members in keys.values():
        spec = specs[members[0]]
        S = len(members)
        one = _init_one(spec, n_features, n_classes, seed)
        params = {k: v.expand(G, S, *v.shape).clone().to(device) for k, v in one.items()}
        if not spec.fit_intercept:
            params["bias"].zero_()  # a constant zero, never trained
        trained = [v for k, v in params.items() if k != "bias" or spec.fit_intercept]
        for p in trained:
            p.grad = torch.zeros_like(p)  # written in place by every step (see _step)
        decays = [specs[i].weight_decay for i in members]
        uniform = len(set(decays)) == 1
        optimizer = AdamW(trained, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                          weight_decay=decays[0] if uniform else 0.0, fused=fused_adamw_supported(device))
        shape = (G, S)
        banks.append({
            "spec": spec, "members": members, "params": params, "trained": trained, "optimizer": optimizer,
            "decays": None if uniform else decays, "dtype": _DTYPES[spec.precision], "work": {},
            "best": {k: v.detach().clone() for k, v in params.items()},
            "best_loss": torch.full(shape, float("inf")),
            "best_epoch": torch.zeros(shape, dtype=torch.long),
            "bad": torch.zeros(shape, dtype=torch.long),
            "done": torch.zeros(shape, dtype=torch.bool),
            "stopped": torch.zeros(shape, dtype=torch.long),  # epochs each chip trained
            "epochs_run": 0,
            "early": spec.early_stopping and val is not None,
            "patience": spec.n_iter_no_change,  # in epochs; raised to min_patience_steps after epoch 0
        })
    step = 0
    for epoch in range(max(b["spec"].epochs for b in banks)):
        epoch_start = step
        active = [b for b in banks if not bool(b["done"].all()) and epoch < b["spec"].epochs]
        if not active:
            break
        for rows, xb, yb, mb in data.epoch(epoch):
            yb = yb.to(device)
            mb = None if mb is None else mb.to(device)
            cast: dict[torch.dtype, torch.Tensor] = {}
            for bank in active:
                dtype = bank["dtype"]
                if dtype not in cast:
                    cast[dtype] = xb.to(device=device, dtype=dtype)
                _step(bank, cast[dtype], yb, mb)
                if bank["decays"] is not None:
                    _decay(bank)
                bank["optimizer"].step()
            if callback is not None:
                callback(epoch, step, rows)
            step += 1
        for bank in active:
            if epoch == 0 and step > epoch_start:
                bank["patience"] = max(bank["spec"].n_iter_no_change,
                                       math.ceil(bank["spec"].min_patience_steps / (step - epoch_start)))
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
        for bank in banks:
            if bool(bank["done"].all()):
                bank["work"].clear()
    results: list[dict | None] = [None] * len(specs)
    for bank in banks:
        if bank["early"]:
            params, val_loss = bank["best"], bank["best_loss"]
        else:
            params = {k: v.detach() for k, v in bank["params"].items()}
            val_loss = None
            bank["best_epoch"][:] = bank["epochs_run"] - 1
        chip_epochs = torch.where(bank["stopped"] > 0, bank["stopped"],
                                  torch.full_like(bank["stopped"], bank["epochs_run"]))
        for s, i in enumerate(bank["members"]):
            results[i] = {
                "params": {k: v[:, s].detach().cpu().clone() for k, v in params.items()},
                "best_epoch": bank["best_epoch"][:, s].numpy().copy(),
                "epochs_run": bank["epochs_run"],
                "chip_epochs": chip_epochs[:, s].numpy().copy(),
                "val_loss": None if val_loss is None else val_loss[:, s].numpy().copy(),
            }
    return results


def _buffer(work: dict, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A work tensor reused from step to step (one per shape: the last, shorter minibatch of an
    epoch gets its own). Fresh allocations of tens of MB cost page faults on every step."""
    key = (name, tuple(shape), dtype)
    if key not in work:
        work[key] = torch.empty(shape, dtype=dtype, device=device)
    return work[key]


#: Most first-layer weights (elements) of the chips one step's products cover at once. The layers
#: of a bank are stepped in slices of this size: their gradients are independent, and one product
#: per 4096 x 1280 weight runs faster on a CPU than one batched product over many layers (whose
#: operands and temporaries no longer fit the caches), while small chips (linear heads, small
#: hidden sizes) still batch many layers per product.
STEP_WEIGHTS = 1 << 22


@torch.no_grad()
def _step(bank: dict, x: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None) -> None:
    """Forward and backward of one minibatch for every chip of a bank, written into the
    parameters' ``.grad`` (the gradient of the sum over chips of each chip's mean cross-entropy).

    The gradients are the ones autograd gives for :func:`bank_logits` + :func:`bank_losses`
    (the same products in the same precision), computed by hand into reused buffers: no graph,
    no per-step allocation of the big tensors. Layers are stepped in slices of
    :data:`STEP_WEIGHTS` first-layer weights.

    Args:
        bank: a bank of :func:`fit_banks`.
        x: (G, B, H) features in the bank's dtype.
        y: (B,) classes. class_mask: (B, C) bool or None.
    """
    params = bank["params"]
    first = params["weight" if bank["spec"].kind == "linear" else "weight_hidden"]
    G = first.shape[0]
    per_layer = first[0].numel()
    size = max(1, min(G, STEP_WEIGHTS // max(per_layer, 1)))
    for g0 in range(0, G, size):
        _step_layers(bank, slice(g0, min(G, g0 + size)), x, y, class_mask)


def _step_layers(bank: dict, layers: slice, x: torch.Tensor, y: torch.Tensor,
                 class_mask: torch.Tensor | None) -> None:
    """:func:`_step` for the chips of a slice of the bank's layers (views: the slice of the
    parameters and their gradients along the first axis)."""
    spec, work, dtype = bank["spec"], bank["work"], bank["dtype"]
    params = {k: v[layers] for k, v in bank["params"].items()}
    grads = {k: v.grad[layers] for k, v in bank["params"].items() if v.grad is not None}
    x = x[layers]
    linear = spec.kind == "linear"
    first = params["weight" if linear else "weight_hidden"]
    bias = params["bias" if linear else "bias_hidden"]
    G, S, D, H = first.shape
    B = x.shape[1]
    dev = first.device
    w = first.view(G, S * D, H)
    xt = x.transpose(1, 2)  # (G, H, B)
    z = _buffer(work, "z", (G, S * D, B), torch.float32, dev)
    if dtype == torch.float32:
        torch.baddbmm(bias.view(G, S * D, 1), w, xt, out=z)
    else:
        w_lp = _buffer(work, "w_lp", (G, S * D, H), dtype, dev)
        w_lp.copy_(w)
        z_lp = _buffer(work, "z_lp", (G, S * D, B), dtype, dev)
        torch.bmm(w_lp, xt, out=z_lp)
        z.copy_(z_lp).add_(bias.view(G, S * D, 1))
    if linear:
        logits = z.view(G * S, D, B)
    else:
        h = z.clamp_min_(0).view(G * S, D, B)  # relu in place: h > 0 exactly where z > 0
        C = params["weight"].shape[2]
        w_out = params["weight"].view(G * S, C, D)
        logits = torch.baddbmm(params["bias"].view(G * S, C, 1), w_out, h)
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask.t(), float("-inf"))
    # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / B, per chip
    dlogits = torch.softmax(logits, dim=1)
    dlogits[:, y, torch.arange(B, device=dev)] -= 1.0
    dlogits.div_(B)
    if linear:
        dz = dlogits.view(G, S * D, B)
    else:
        if spec.fit_intercept:
            torch.sum(dlogits, dim=2, out=grads["bias"].view(G * S, C))
        torch.bmm(dlogits, h.transpose(1, 2), out=grads["weight"].view(G * S, C, D))
        dh = _buffer(work, "dh", (G * S, D, B), torch.float32, dev)
        torch.bmm(w_out.transpose(1, 2), dlogits, out=dh)
        # relu's gradient, in place: h (no longer needed this step) becomes the 0 / 1 indicator of
        # h > 0 and multiplies dh (a fresh tensor of this size costs page faults every step; a bool
        # mask multiplies several times slower than a float one on a CPU)
        dz = dh.mul_(h.gt_(0)).view(G, S * D, B)
    if spec.fit_intercept or not linear:
        torch.sum(dz, dim=2, out=grads["bias" if linear else "bias_hidden"].view(G, S * D))
    grad = grads["weight" if linear else "weight_hidden"].view(G, S * D, H)
    if dtype == torch.float32:
        torch.bmm(dz, x, out=grad)
    else:
        dz_lp = _buffer(work, "dz_lp", (G, S * D, B), dtype, dev)
        dz_lp.copy_(dz)
        g_lp = _buffer(work, "g_lp", (G, S * D, H), dtype, dev)
        torch.bmm(dz_lp, x, out=g_lp)
        grad.copy_(g_lp)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string ("2.13.0+cpu" -> (2, 13)); this torch's by default."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__ if version is None else version))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def fused_adamw_supported(device: str | torch.device, version: str | None = None) -> bool:
    """Whether torch (this one, or ``version``) has a fused AdamW kernel for the device (one pass
    over each tensor per step, several times faster than the default on a CPU): CUDA in every
    torch this package supports, the CPU since torch 2.4. Other devices take the default path."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and torch_version(version) >= (2, 4))


#: torch versions (major, minor) whose functional AdamW (``torch.optim.adamw.adamw``, not a
#: documented API) :class:`AdamW` was tested with, and runs on; other versions step with
#: ``torch.optim.AdamW``. Add a version after ``tests/test_probe.py``'s AdamW tests pass on it.
FUNCTIONAL_ADAMW_TESTED = ((2, 13),)


def functional_adamw_tested(version: str | None = None) -> bool:
    """Whether :class:`AdamW` steps with torch's functional update on this torch (or ``version``)."""
    return torch_version(version) in FUNCTIONAL_ADAMW_TESTED


class AdamW:
    """``torch.optim.AdamW``'s update, for tensors whose ``.grad`` each step fills.

    On the torch versions of :data:`FUNCTIONAL_ADAMW_TESTED` the step is torch's own functional
    AdamW (``torch.optim.adamw.adamw``: the same code path ``torch.optim.AdamW.step`` runs, the
    fused kernel where the device has one), with the state kept here: the first construction of a
    ``torch.optim.Optimizer`` in a process imports ``torch._dynamo`` (about a second, most of the
    wall time of training chips on a small cache) and its step adds some overhead. On any other
    torch, or with ``functional=False``, it is ``torch.optim.AdamW`` itself. Tests check that
    both paths move the parameters exactly as ``torch.optim.AdamW`` does.

    ``param_groups`` mirrors torch's (one group; ``lr`` may be changed between steps).
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, fused: bool = False,
                 functional: bool | None = None) -> None:
        self.params = list(params)
        self.functional = functional_adamw_tested() if functional is None else bool(functional)
        if not self.functional:
            self._optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(betas), eps=eps,
                                                weight_decay=weight_decay, fused=fused or None)
            self.param_groups = self._optimizer.param_groups
            return
        # Looked up here, not at import: it exists as called on the tested versions only.
        from torch.optim.adamw import adamw

        self._adamw = adamw
        self.param_groups = [dict(params=self.params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  amsgrad=False, maximize=False, fused=fused)]
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # torch keeps the step count as a float32 tensor on the parameter's device when fused
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu") for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        if not self.functional:
            self._optimizer.step()
            return
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        self._adamw(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq, [], self.steps,
                    foreach=False if group["fused"] else None, fused=group["fused"] or None, capturable=False,
                    differentiable=False, grad_scale=None, found_inf=None, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


_THREADS: dict[int, int] = {}


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for the trainer: ``requested``, or the faster of 1 and one per CPU.

    The choice (made once per process) times a small product with the features and an
    optimizer-like elementwise update each way: where the CPUs the OS reports share physical
    cores (common on virtual machines), one thread is often several times faster than two.
    """
    if requested:
        return int(requested)
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_cpu <= 1:
        return 1
    if n_cpu not in _THREADS:
        before = torch.get_num_threads()
        x, w = torch.randn(256, 1024), torch.randn(512, 1024)
        p, g = torch.randn(1 << 20), torch.randn(1 << 20)
        try:
            timings = {1: float("inf"), n_cpu: float("inf")}
            for _ in range(5):  # interleaved, best of 5: a burst of other load hits both counts alike
                for n in (1, n_cpu):
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    for _ in range(2):
                        x @ w.t()
                        p.mul_(0.999).addcmul_(g, g, value=1e-3)
                    timings[n] = min(timings[n], time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
        _THREADS[n_cpu] = min(timings, key=timings.get)
        log.debug("torch threads: %d (timed %s)", _THREADS[n_cpu],
                 {n: f"{1e3 * t:.1f} ms" for n, t in timings.items()})
    return _THREADS[n_cpu]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _decay(bank: dict) -> None:
    """AdamW's decoupled weight decay, one value per setting: ``p *= 1 - lr * wd`` (the factor
    computed in double and rounded, as torch does with a scalar weight decay)."""
    lr = bank["optimizer"].param_groups[0]["lr"]
    factors = torch.tensor([1.0 - lr * wd for wd in bank["decays"]], dtype=torch.float32)
    for p in bank["trained"]:
        p.mul_(factors.to(p.device).view(1, -1, *([1] * (p.dim() - 2))))


@torch.no_grad()
def _early_stopping_update(bank: dict, val, epoch: int) -> None:
    """Snapshot the chips whose validation loss improved; retire the ones out of patience.

    A retired chip keeps training with its bank (its parameters are not shared), but its best
    state is frozen, so it ends where it would have stopped alone.
    """
    spec: ChipSpec = bank["spec"]
    x_val, y_val, m_val = val
    logits = predict_bank(spec.kind, bank["params"], x_val, m_val)  # (G, S, Nv, C), float32
    G, S, Nv, C = logits.shape
    losses = F.cross_entropy(logits.reshape(G * S * Nv, C), y_val.cpu().repeat(G * S),
                             reduction="none").view(G, S, Nv).mean(dim=2)
    live = ~bank["done"]
    improved = (losses < bank["best_loss"] - spec.tol) & live
    for g, s in improved.nonzero().tolist():  # copy only the improved chips (no full-size temporaries)
        for name, value in bank["params"].items():
            bank["best"][name][g, s].copy_(value[g, s])
    bank["best_loss"] = torch.where(improved, losses, bank["best_loss"])
    bank["best_epoch"] = torch.where(improved, torch.full_like(bank["best_epoch"], epoch), bank["best_epoch"])
    bank["bad"] = torch.where(improved, torch.zeros_like(bank["bad"]), bank["bad"] + live.long())
    bank["done"] |= bank["bad"] >= bank["patience"]
