"""The linear probe of the collapse metrics: softmax regression by L-BFGS on z-scored, PCA-reduced features.

sklearn's multinomial logistic regression objective (L2, C=1), in torch so that large feature sets fit fast.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_softmax_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, n_classes: int, inverse_regularization: float = 1.0,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS with sklearn's objective C*sum(loss) + |W|^2/2; returns (W, b)."""
    n, d = x_train.shape
    weight = torch.zeros(d, n_classes, dtype=x_train.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x_train.dtype, requires_grad=True)
    l2 = 1.0 / (inverse_regularization * n)  # the objective divided by C*n: mean loss + l2/2 |W|^2
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=1e-7,
        tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_predictions(
    features: np.ndarray | torch.Tensor, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
    probe_dim: int | None = 128, inverse_regularization: float = 1.0, max_iter: int = 300,
) -> np.ndarray:
    """Fit a softmax probe on z-scored (then PCA-reduced to probe_dim) train features; predict the test codes."""
    x = torch.as_tensor(features)
    labels = np.asarray(labels, dtype=np.int64)
    x_train = x[torch.from_numpy(train_idx)].to(torch.float32)
    mean = x_train.mean(0, dtype=torch.float64)
    # sklearn StandardScaler: population std
    std = ((x_train.to(torch.float64) - mean) ** 2).mean(0).sqrt().clamp(min=1e-8)
    scale = (1.0 / std).to(torch.float32)
    x_train = (x_train - mean.to(torch.float32)) * scale
    projection = None
    if probe_dim is not None and probe_dim < x_train.shape[1]:
        # eigh of the D x D covariance: exact PCA without an N x D SVD
        covariance = (x_train.T @ x_train).to(torch.float64) / max(1, x_train.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(covariance)
        projection = eigvecs[:, torch.argsort(eigvals, descending=True)[:probe_dim]].to(torch.float32)
        x_train = x_train @ projection
    x_test = (x[torch.from_numpy(test_idx)].to(torch.float32) - mean.to(torch.float32)) * scale
    if projection is not None:
        x_test = x_test @ projection
    n_classes = int(labels.max()) + 1
    weight, bias = fit_softmax_probe(
        x_train, torch.from_numpy(labels[train_idx]), n_classes, inverse_regularization, max_iter
    )
    return (x_test @ weight + bias).argmax(1).numpy()
