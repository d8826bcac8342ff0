"""Models of the few-shot harness, used functionally (``torch.func.functional_call``).

* :class:`ConvNet` — the 4-block convolutional network of MAML / iMAML: each block is a
  3×3 convolution (``filters`` channels), batch norm, ReLU; Omniglot uses stride-2
  convolutions and averages the final 2×2 map (as MAML's Omniglot model), Mini-ImageNet
  uses stride-1 convolutions followed by 2×2 max-pooling, with 32 filters, and flattens.
  A linear layer maps the features to ``ways`` logits.  Weights are Glorot-uniform and
  biases zero (MAML's initialiser); the MLP keeps PyTorch's default initialisation.
* :class:`MLP` — MAML's sinusoid regressor: 1 → 40 → 40 → 1 with ReLU.

Batch norm uses the batch statistics of the data it is applied to (the support set
during adaptation, the query set when measuring the query loss), as in MAML and iMAML;
there are no running statistics and no buffers, so a model is fully described by its
parameter dict.  It is written out in elementary operations (:func:`task_batch_norm`)
rather than calling ``torch.nn.functional.batch_norm``: in PyTorch 2.13 the
forward-mode derivative of ``batch_norm``'s backward is wrong under
``vmap(grad(...))`` (a Hessian-vector product computed as ``jvp(vmap(grad(loss)))``
differs from finite differences in the batch-norm weight block), while the
elementary form is exact in every composition of ``vmap``/``grad``/``jvp`` and double
backward.  ``tests/applications/test_imaml_models.py`` checks this.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvNet", "MLP", "TaskBatchNorm", "build_model", "task_batch_norm"]

BN_EPS = 1e-5


def task_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = BN_EPS) -> Tensor:
    """Batch norm over ``(N, H, W)`` with the batch's own statistics (biased variance)."""
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return (x - mean) * torch.rsqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


class TaskBatchNorm(nn.Module):
    """Affine batch norm with task batch statistics (no running statistics)."""

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return task_batch_norm(x, self.weight, self.bias, self.eps)


def _glorot_(layer: nn.Module) -> None:
    """Glorot/Xavier-uniform weights and zero biases, the initialiser of MAML's conv layers.

    It gives larger conv weights than PyTorch's default, which matters here: batch norm
    makes the loss invariant to the scale of the conv weights before it, and that
    invariance puts negative curvature of size about ``‖∇L‖/‖w‖`` into the Hessian —
    exactly what iMAML's ``H + λI`` must dominate for CG to be valid.
    """
    nn.init.xavier_uniform_(layer.weight)  # type: ignore[arg-type]
    nn.init.zeros_(layer.bias)  # type: ignore[arg-type]


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, strided: bool) -> None:
        super().__init__()
        self.strided = strided
        self.conv = nn.Conv2d(cin, cout, 3, stride=2 if strided else 1, padding=1)
        _glorot_(self.conv)
        self.bn = TaskBatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return h if self.strided else F.max_pool2d(h, 2)


class ConvNet(nn.Module):
    """4-block conv net (MAML, Finn et al. 2017; iMAML, Rajeswaran et al. 2019).

    Args:
        in_channels: 1 (Omniglot) or 3 (Mini-ImageNet).
        ways: number of output classes.
        filters: channels per block (64 Omniglot, 32 Mini-ImageNet).
        strided: stride-2 convolutions and a spatial mean (Omniglot) instead of
            max-pooling and flattening (Mini-ImageNet).
        image_size: side of the (square) input images.
        blocks: number of conv blocks (4).
    """

    def __init__(
        self, in_channels: int, ways: int, filters: int = 64, *, strided: bool = True, image_size: int = 28, blocks: int = 4
    ) -> None:
        super().__init__()
        chans = [in_channels] + [filters] * blocks
        self.blocks = nn.Sequential(*[ConvBlock(chans[i], chans[i + 1], strided) for i in range(blocks)])
        self.strided = strided
        if strided:
            features = filters
        else:
            side = image_size
            for _ in range(blocks):
                side //= 2
            if side < 1:
                raise ValueError(f"images of side {image_size} are too small for {blocks} max-pooling blocks")
            features = filters * side * side
        self.head = nn.Linear(features, ways)
        _glorot_(self.head)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(x)
        h = h.mean(dim=(2, 3)) if self.strided else h.flatten(1)
        return self.head(h)


class MLP(nn.Module):
    """MAML's sinusoid regressor: ``in → hidden → hidden → out`` with ReLU."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], out_features)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def build_model(
    dataset: str,
    ways: int,
    *,
    filters: int | None = None,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    hidden: tuple[int, ...] = (40, 40),
) -> nn.Module:
    """The model the paper uses for ``dataset`` (the caller seeds the initialisation)."""
    if dataset == "sinusoid":
        return MLP(1, hidden, 1)
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    if filters is not None and filters < 1:  # not `filters or 64`: 0 would build a 64-filter net silently
        raise ValueError(f"filters must be >= 1, got {filters}")
    if dataset == "omniglot":
        return ConvNet(c, ways, 64 if filters is None else filters, strided=True, image_size=h)
    if dataset == "miniimagenet":
        return ConvNet(c, ways, 32 if filters is None else filters, strided=False, image_size=h)
    raise ValueError(f"unknown dataset {dataset!r}")


def count_parameters(params: dict[str, Any]) -> int:
    return sum(math.prod(p.shape) for p in params.values())
