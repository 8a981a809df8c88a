"""Losses shared by the neural regressors."""

from __future__ import annotations

import torch


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """HyperFusion eq. 7, averaged over the finite targets (NaN labels are ignored).

    L = 0.5 * (y - y_hat)^2 if |y - y_hat| <= delta, else delta * |y - y_hat| - 0.5 * delta^2.
    Returns a scalar; 0 (with a gradient path) when no target is finite.
    """
    pred = pred.float()
    target = target.float()
    keep = torch.isfinite(target)
    if not bool(keep.any()):
        return pred.sum() * 0.0
    err = (target[keep] - pred[keep]).abs()
    quadratic = 0.5 * err**2
    linear = delta * err - 0.5 * delta**2
    return torch.where(err <= delta, quadratic, linear).mean()
