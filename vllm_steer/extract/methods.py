"""Pure-tensor direction finding for contrastive pairs (no model involved).

Every function takes ``pos`` and ``neg``: float tensors ``[n_pairs, hidden]`` where row
``k`` of each is the hidden state of the positive / negative prompt of pair ``k``.
Computation is done in float64; directions are returned as float32 ``[hidden]``.

Methods (names as in repeng, which popularised them):

``pca_diff``
    first principal component of the pairwise differences ``d_k = pos_k - neg_k``
    (standard PCA: the differences are centred on their mean first, so this is the axis
    along which the persona *gap* varies most; it relies on that variation, not on the
    mean gap). Unit norm.
``pca_center``
    first principal component after centring each pair on its own mean, i.e. of the
    ``2 n`` points ``pos_k - m_k`` and ``neg_k - m_k`` with ``m_k = (pos_k + neg_k) / 2``.
    Those points are ``+-d_k / 2``, so this is the top right singular vector of the
    *uncentred* differences: it keeps the mean gap. Unit norm.
``mean_diff``
    ``mean(pos) - mean(neg)`` (the mean gap itself; not normalised here).

A PCA axis has no sign; ``orient`` flips a direction so that for the majority of pairs
the positive prompt projects higher than the negative one (a positive steering scale
then moves toward the positive persona). ``mean_diff`` is oriented the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

METHODS = ("pca_diff", "pca_center", "mean_diff")


def _check(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.ndim != 2 or pos.shape != neg.shape:
        raise ValueError(
            f"pos and neg must both be [n_pairs, hidden], got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}"
        )
    if pos.shape[0] < 1:
        raise ValueError("need at least one pair")


def first_component(x: torch.Tensor, *, center: bool) -> torch.Tensor:
    """Unit float64 ``[hidden]`` top right singular vector of ``x [n, hidden]``.

    With ``center`` the rows are centred first (standard PCA). Sign is arbitrary.
    """
    x = x.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    if x.shape[0] == 0 or not bool(x.abs().amax() > 0):
        raise ValueError("cannot find a principal component: the data has no variance")
    # [n, h] = U S Vh; Vh[0] is the unit direction of largest (uncentred) second moment.
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[0]


def pca_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unit ``[hidden]``: first PC of the centred differences ``pos - neg`` (unoriented)."""
    _check(pos, neg)
    return first_component(pos.double() - neg.double(), center=True)


def pca_center(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unit ``[hidden]``: first PC of the pair-centred points ``+-(pos - neg) / 2`` (unoriented)."""
    _check(pos, neg)
    half = (pos.double() - neg.double()) / 2
    return first_component(torch.cat([half, -half]), center=False)


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``[hidden]``: ``mean(pos) - mean(neg)``."""
    _check(pos, neg)
    return pos.double().mean(0) - neg.double().mean(0)


_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "pca_diff": pca_diff,
    "pca_center": pca_center,
    "mean_diff": mean_diff,
}


def check_method(method: str) -> str:
    if method not in _FUNCS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def pair_margins(pos: torch.Tensor, neg: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """float64 ``[n_pairs]``: ``(pos_k - neg_k) . direction`` (the pair's projected gap)."""
    return (pos.double() - neg.double()) @ direction.double()


def separation(pos: torch.Tensor, neg: torch.Tensor, direction: torch.Tensor) -> float:
    """Fraction of pairs whose positive prompt projects strictly higher than the negative."""
    return float((pair_margins(pos, neg, direction) > 0).double().mean())


def orient(pos: torch.Tensor, neg: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``direction`` or ``-direction``, whichever orders more pairs positive-above-negative.

    Ties (as many pairs each way) are broken by the sign of the summed margins.
    """
    m = pair_margins(pos, neg, direction)
    up, down = int((m > 0).sum()), int((m < 0).sum())
    if down > up or (down == up and float(m.sum()) < 0):
        return -direction
    return direction


def set_mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """float32 ``[hidden]``: ``mean(pos) - mean(neg)`` for two *unpaired* sets
    ``pos [n_pos, hidden]`` and ``neg [n_neg, hidden]`` (the refusal-direction recipe)."""
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"pos and neg must be [n, hidden] with one hidden size, got "
                         f"{tuple(pos.shape)} and {tuple(neg.shape)}")
    if pos.shape[0] < 1 or neg.shape[0] < 1:
        raise ValueError("need at least one prompt in each set")
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def set_separation(pos: torch.Tensor, neg: torch.Tensor, direction: torch.Tensor) -> float:
    """Fraction of all prompts on their own side of the midpoint between the two sets'
    mean projections onto ``direction`` (1.0: a threshold separates the sets perfectly)."""
    d = direction.double()
    pp, pn = pos.double() @ d, neg.double() @ d
    mid = (pp.mean() + pn.mean()) / 2
    return float(((pp > mid).sum() + (pn < mid).sum()) / (len(pp) + len(pn)))


def find_direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """Oriented float32 ``[hidden]`` direction separating ``pos`` from ``neg`` with ``method``."""
    direction = _FUNCS[check_method(method)](pos, neg)
    return orient(pos, neg, direction).float()
