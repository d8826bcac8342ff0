"""Run configuration and the per-dataset / per-algorithm defaults.

Every option left ``None`` by the command line is filled by :func:`resolve_config` from
the tables below; the resolved configuration is what a checkpoint stores, so
evaluation and ``--resume`` reuse exactly the trained setup.

Defaults follow the papers where they say something:

* iMAML (Rajeswaran et al. 2019, Omniglot): λ = 2, 16 inner GD steps for 5-way and 25
  for 20-way, 5 CG steps, Adam on the meta-parameters (lr 1e-3), meta-batch 32
  (16 for 20-way, as MAML).
* MAML (Finn et al. 2017): Omniglot 5-way 1 SGD step of 0.4, 20-way 5 steps of 0.1;
  Mini-ImageNet 5 steps of 0.01, meta-batch 4; sinusoid: 1-40-40-1 MLP, inner lr 0.01,
  meta-batch 25.
* Choices of this harness where the papers give no number for this setting: Reptile's
  inner SGD (10 steps of 0.1 on Omniglot, as plain SGD rather than Reptile's Adam, so the
  baselines share one inner optimiser), iMAML-HF's budget (5 Newton iterations of 5
  CG steps each), the sinusoid iMAML settings (λ = 1, 16 GD steps of 0.01, meta-batch
  16: the best of a small sweep of 1000-step runs, see README), and 15 query images
  per class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .algorithms import ALGORITHMS, LearnerConfig
from .tasks import DATASETS

__all__ = ["RunConfig", "default_out_dir", "default_device", "resolve_config"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (saved in the checkpoint as a plain dict)."""

    dataset: str
    algorithm: str
    ways: int
    shots: int
    queries: int
    meta_steps: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    lam: float
    learn_lam: bool
    lam_min: float
    lam_lr: float
    cg_steps: int
    cg_tol: Optional[float]
    hf_cg_steps: int
    linsolve: str
    hvp: str
    outer_lr: float
    seed: int
    device: str
    dtype: str
    filters: Optional[int]
    split_scheme: str
    data_root: Optional[str]
    out: str
    checkpoint_every: int
    eval_episodes: int
    eval_batch: int
    eval_seed: int

    @property
    def task(self) -> str:
        return "regression" if self.dataset == "sinusoid" else "classification"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def learner_config(self) -> LearnerConfig:
        return LearnerConfig(
            algorithm=self.algorithm,
            task=self.task,
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            lam=self.lam,
            learn_lam=self.learn_lam,
            lam_min=self.lam_min,
            cg_steps=self.cg_steps,
            cg_tol=self.cg_tol,
            hf_cg_steps=self.hf_cg_steps,
            linsolve=self.linsolve,
            hvp=self.hvp,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}")
        return cls(**d)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_out_dir(dataset: str, algorithm: str, ways: int, shots: int) -> str:
    if dataset == "sinusoid":
        return f"runs/sinusoid-{algorithm}-{shots}shot"
    return f"runs/{dataset}-{algorithm}-{ways}way-{shots}shot"


def _inner_defaults(dataset: str, algorithm: str, ways: int) -> tuple[int, float]:
    """(inner_steps, inner_lr) for a dataset/algorithm/ways."""
    if dataset == "sinusoid":
        return {"imaml": (16, 0.01), "imaml-hf": (5, 0.01), "maml": (1, 0.01), "fomaml": (1, 0.01), "reptile": (10, 0.01)}[algorithm]
    if dataset == "omniglot":
        if algorithm == "imaml":
            return (16 if ways <= 5 else 25), 0.1
        if algorithm == "imaml-hf":
            return 5, 0.1
        if algorithm in ("maml", "fomaml"):
            return (1, 0.4) if ways <= 5 else (5, 0.1)
        return 10, 0.1
    # miniimagenet
    if algorithm == "imaml":
        return 16, 0.01
    if algorithm == "imaml-hf":
        return 5, 0.01
    if algorithm in ("maml", "fomaml"):
        return 5, 0.01
    return 10, 0.01


_DEFAULTS = {
    # dataset: (ways, shots, queries, meta_batch, lam, meta_steps)
    "sinusoid": (1, 5, 10, 16, 1.0, 70000),
    "omniglot": (5, 1, 15, 32, 2.0, 30000),
    "miniimagenet": (5, 1, 15, 4, 0.5, 30000),
}


def resolve_config(**kw: Any) -> RunConfig:
    """Fill every ``None`` option with the default for its dataset/algorithm/ways."""
    dataset = kw.get("dataset") or "sinusoid"
    algorithm = kw.get("algorithm") or "imaml"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    ways0, shots0, queries0, batch0, lam0, steps0 = _DEFAULTS[dataset]

    def get(name: str, default: Any) -> Any:
        v = kw.get(name)
        return default if v is None else v

    ways = 1 if dataset == "sinusoid" else get("ways", ways0)
    shots = get("shots", shots0)
    steps_d, lr_d = _inner_defaults(dataset, algorithm, ways)
    meta_batch_default = batch0 if not (dataset == "omniglot" and ways > 5) else 16
    cfg = RunConfig(
        dataset=dataset,
        algorithm=algorithm,
        ways=ways,
        shots=shots,
        queries=get("queries", queries0),
        meta_steps=get("meta_steps", steps0),
        meta_batch=get("meta_batch", meta_batch_default),
        inner_steps=get("inner_steps", steps_d),
        inner_lr=float(get("inner_lr", lr_d)),
        lam=float(get("lam", lam0)),
        learn_lam=bool(get("learn_lam", False)),
        lam_min=float(get("lam_min", 0.1)),
        lam_lr=float(get("lam_lr", 1e-2)),
        cg_steps=get("cg_steps", 5),
        cg_tol=kw.get("cg_tol"),
        hf_cg_steps=get("hf_cg_steps", 5),
        # Conv nets with batch norm make H + λI indefinite at λ = 2 (README: "Negative
        # curvature"): CG then stops early on most tasks, so image datasets default to MINRES.
        linsolve=get("linsolve", "cg" if dataset == "sinusoid" else "minres"),
        hvp=get("hvp", "reverse"),
        outer_lr=float(get("outer_lr", 1e-3)),
        seed=get("seed", 0),
        device=get("device", default_device()),
        dtype=get("dtype", "float32"),
        filters=kw.get("filters"),
        split_scheme=get("split_scheme", "maml"),
        data_root=kw.get("data_root"),
        out=get("out", default_out_dir(dataset, algorithm, ways, shots)),
        checkpoint_every=get("checkpoint_every", 500),
        eval_episodes=get("eval_episodes", 600),
        eval_batch=get("eval_batch", 50 if dataset == "sinusoid" else 25),
        eval_seed=get("eval_seed", 0),
    )
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Clear errors for bad values (the data-dependent ones come from the task source)."""
    positive = ("ways", "shots", "queries", "meta_batch", "cg_steps", "hf_cg_steps", "checkpoint_every", "eval_episodes", "eval_batch")
    for name in positive:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.meta_steps < 0:
        raise ValueError(f"--meta-steps must be >= 0, got {cfg.meta_steps}")
    if not 0 <= cfg.seed < 1_000_000:
        raise ValueError(f"--seed must be in [0, 1000000), got {cfg.seed}")
    for name in ("inner_lr", "lam", "outer_lr", "lam_lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
    if cfg.filters is not None and cfg.filters < 1:
        raise ValueError(f"--filters must be >= 1, got {cfg.filters}")
    if cfg.dataset != "sinusoid" and cfg.ways < 2:
        raise ValueError(f"--ways must be >= 2 for classification, got {cfg.ways}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device} requested but CUDA is not available")
    cfg.learner_config()  # validates the inner-loop settings
