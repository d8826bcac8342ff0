"""The learner of a run, built once for training, evaluation, timing and plots.

:func:`build_learner` makes the model (seeded), the :class:`~.algorithms.MetaLearner` and
the meta-parameters θ and raw λ parameters ρ of a :class:`~.config.RunConfig`;
:func:`load_learner` the same with a checkpoint's values.  Training and evaluation both
import this module (neither imports the other for it).
"""

from __future__ import annotations

from typing import Any

import torch

from .algorithms import MetaGradient, MetaLearner
from .config import RunConfig
from .models import build_model

__all__ = ["build_learner", "load_learner", "set_meta_gradients"]

Params = dict[str, torch.Tensor]


def build_learner(cfg: RunConfig, image_shape: tuple[int, ...]) -> tuple[MetaLearner, Params, Params]:
    """Model (seeded from ``cfg.seed``), learner, meta-parameters θ and raw λ parameters ρ."""
    torch.manual_seed(cfg.seed)
    shape = tuple(image_shape) if len(image_shape) == 3 else (1, 28, 28)
    model = build_model(cfg.dataset, cfg.ways, filters=cfg.filters, image_shape=shape)  # type: ignore[arg-type]
    model = model.to(device=cfg.device, dtype=cfg.torch_dtype)
    learner = MetaLearner(model, cfg.learner)
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    rho = {k: r.requires_grad_(True) for k, r in learner.init_rho(theta).items()}
    return learner, theta, rho


def load_learner(cfg: RunConfig, image_shape: tuple[int, ...], ckpt: dict[str, Any]) -> tuple[MetaLearner, Params, Params]:
    """:func:`build_learner` with θ and ρ set to a checkpoint's values (evaluation, plots)."""
    learner, theta, rho = build_learner(cfg, image_shape)
    with torch.no_grad():
        for k, v in theta.items():
            v.copy_(ckpt["theta"][k])
        for k, v in rho.items():
            v.copy_(ckpt["rho"][k])
    return learner, theta, rho


def set_meta_gradients(theta: Params, rho: Params, res: MetaGradient) -> None:
    """Hand a :class:`~.algorithms.MetaGradient` to the outer optimiser: ``.grad`` of every
    meta-parameter (θ) and raw λ parameter (ρ), detached."""
    for k, p in theta.items():
        p.grad = res.grads[k].detach()
    for k, p in rho.items():
        p.grad = res.rho_grads[k].detach()
