"""Meta-training loop: batched meta-gradients, Adam, CSV/TensorBoard logs, atomic checkpoints.

Outputs in ``cfg.out``:

* ``checkpoint.pt`` — written atomically every ``checkpoint_every`` steps and at the end
  (see :mod:`.checkpoint`); ``--resume`` continues from it exactly, and so does a
  ``torchrun --max-restarts`` restart of the launch that wrote it (:mod:`.elastic`);
* ``log.csv`` — one row per meta-step (columns :data:`CSV_COLUMNS`; a resumed run drops
  rows logged after the checkpoint it restarts from, then appends);
* ``config.json`` — the resolved configuration;
* ``val.csv`` and ``best.pt`` — with ``eval_every > 0``: every ``eval_every`` meta-steps (and
  at the last) the meta-parameters are evaluated on ``val_episodes`` fixed episodes of the
  validation split (columns :data:`VAL_COLUMNS`; ``elapsed_seconds`` counts training time
  only), and the best so far is kept in ``best.pt`` (a checkpoint like ``checkpoint.pt``).
  Omniglot then meta-trains on the training characters without the validation ones.
* ``tensorboard/`` — the same scalars, only if ``torch.utils.tensorboard`` imports.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

from bilevel import NonFiniteError
from bilevel.distributed import all_reduce_mean, average_gradients

from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from .config import RunConfig
from .distributed import DistContext, check_in_sync, shard
from .elastic import fault_step, inject_fault, launch_key
from .evaluate import evaluate_episodes
from .health import InnerHealthWatch
from .learner import build_learner, set_meta_gradients
from .rundir import (
    RunLock,
    discard_old_run,
    new_run_id,
    read_run_id,
    remove_stale_temporaries,
)
from .runlog import (
    METRIC_COLUMN,
    RunLog,
    peak_memory_mb,
)
from .tasks import TaskSource, make_task_source

__all__ = ["Trainer", "train"]

BEST_NAME = "best.pt"

# Keys of RunConfig that may differ between a checkpoint and the run that resumes it.
RESUMABLE_OVERRIDES = ("meta_steps", "device", "data_root", "checkpoint_every", "out", "eval_episodes", "eval_batch", "power_iters", "batching",
                       "compile", "query_batching")


class Trainer:
    """Owns the state of one meta-training run (so that tests can step it)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, dist_ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_ctx or DistContext()
        if self.dist.enabled and cfg.meta_batch % self.dist.world:
            raise ValueError(
                f"--meta-batch {cfg.meta_batch} does not split evenly over {self.dist.world} processes: use a multiple "
                f"of {self.dist.world} (the meta-batch is global, each process takes an equal share)"
            )
        self.writer = self.dist.is_writer
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / CHECKPOINT_NAME
        self.progress = progress
        self.log = log
        self._announced: set[tuple] = set()  # the measured choices already printed
        self.device = torch.device(cfg.device)
        self._fault_at = fault_step(self.dist.rank)  # a test hook (BILEVEL_FAULT_AT_STEP), normally None
        # One writer per folder (released on exit, however the process ends); then clean up
        # what an interrupted atomic write left behind.  Ranks other than 0 write nothing.
        self.lock = RunLock(self.out) if self.writer else _NoLock()
        try:
            if self.writer:
                remove_stale_temporaries(self.out)
            if self.ckpt_path.exists() and not resume and not overwrite:
                raise FileExistsError(
                    f"{str(self.ckpt_path)!r} exists: pass --resume to continue that run, --overwrite to start over, "
                    "or choose another --out"
                )
            if resume and not self.ckpt_path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {str(self.ckpt_path)!r}")
            if overwrite and not resume and self.writer:
                # The checkpoint goes first: a new run that dies before its own first
                # checkpoint must leave nothing that --resume could continue.
                discard_old_run(self.out)
            if self.dist.enabled:
                torch.distributed.barrier()  # the others wait for rank 0's clean-up
            self._setup(cfg, resume)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: RunConfig, resume: bool) -> None:

        self.source: TaskSource = make_task_source(
            cfg.dataset, "train", ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=cfg.seed,
            data_root=cfg.data_root, split_scheme=cfg.split_scheme, hold_out_val=cfg.eval_every > 0,
        )
        self.val_source: TaskSource | None = None
        if cfg.eval_every > 0:
            self.val_source = make_task_source(
                cfg.dataset, "val", ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=cfg.eval_seed,
                data_root=cfg.data_root, split_scheme=cfg.split_scheme,
            )
        self.best_val: float | None = None
        self.health = InnerHealthWatch(cfg.meta_steps, cfg.learner.inner_optimizer, cfg.learner.recipe, self.log)
        self.val_last = ""
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.learner, self.theta, self.rho = build_learner(cfg, self.source.image_shape)
        groups: list[dict[str, Any]] = [{"params": list(self.theta.values()), "lr": cfg.outer_lr}]
        if self.rho:
            groups.append({"params": list(self.rho.values()), "lr": cfg.lam_lr})
        self.opt = torch.optim.Adam(groups, eps=cfg.adam_eps)
        self.step = 0
        self.elapsed = 0.0
        self.run_id = new_run_id()
        if resume:
            self._load(load_checkpoint(self.ckpt_path, map_location=self.device))
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.logs = RunLog(self.out, writer=self.writer, validation=cfg.eval_every > 0, resume=resume, step=self.step,
                           info={"torch": torch.__version__, "run_id": self.run_id}, device=self.device)
        self.csv_path = self.logs.csv_path

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "elapsed_seconds": self.elapsed,
            "config": self.cfg.to_dict(),
            "theta": {k: v.detach().clone() for k, v in self.theta.items()},
            "rho": {k: v.detach().clone() for k, v in self.rho.items()},
            "optimizer": self.opt.state_dict(),
            "sampler_position": self.source.position,
            "rng": capture_rng_state(),
            "best_val": self.best_val,
            "run_id": self.run_id,
            # The torchrun launch that wrote it: a restart of that launch resumes from it (.elastic).
            "launch": launch_key(),
            # The measured batching choices: a resumed run makes the same ones (vmap and the
            # per-task loop agree to rounding only, and a new timing can come out the other way).
            "choices": {"layer_strategies": self.learner.layer.strategy_state() if self.learner.layer is not None else {},
                        "query": dict(self.learner.query_choices)},
        }

    def save(self) -> None:
        check_in_sync(list(self.theta.values()) + list(self.rho.values()), self.dist, self.step)
        if self.writer:
            atomic_torch_save(self.state_dict(), self.ckpt_path)
        self.saved_step: int | None = self.step

    def _load(self, ckpt: dict[str, Any]) -> None:
        folder_id, ckpt_id = read_run_id(self.out), ckpt.get("run_id")
        if folder_id is not None and ckpt_id is not None and folder_id != ckpt_id:
            raise ValueError(
                f"--resume: {str(self.ckpt_path)!r} belongs to another run than the log and configuration in "
                f"{str(self.out)!r} (run ids {ckpt_id[:8]} and {folder_id[:8]}): refusing to mix them; "
                "start over with --overwrite"
            )
        if ckpt_id is not None:
            self.run_id = ckpt_id
        saved, now = RunConfig.from_dict(ckpt["config"]).to_dict(), self.cfg.to_dict()
        diffs = {k: (saved[k], now[k]) for k in saved if k not in RESUMABLE_OVERRIDES and saved[k] != now[k]}
        if diffs:
            pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(f"--resume with a different configuration ({pretty}); drop those flags to continue")
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(ckpt["theta"][k])
            for k, v in self.rho.items():
                v.copy_(ckpt["rho"][k])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.elapsed = float(ckpt.get("elapsed_seconds", 0.0))
        self.source.position = int(ckpt["sampler_position"])
        self.best_val = ckpt.get("best_val")
        restore_rng_state(ckpt["rng"])
        choices = ckpt.get("choices", {})
        if self.learner.layer is not None and choices.get("layer_strategies"):
            self.learner.layer.load_strategy_state(choices["layer_strategies"])
        self.learner.query_choices.update(choices.get("query", {}))

    # -- the loop ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One meta-step: sample B tasks, batched meta-gradient, Adam step; returns the log row."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # Every rank draws the same global meta-batch and keeps its share.
        batch = shard(self.source.sample(cfg.meta_batch), self.dist).to(self.device, cfg.torch_dtype)
        try:
            res = self.learner.meta_gradient(self.theta, self.rho, batch)
        except NonFiniteError as err:
            raise FloatingPointError(
                f"meta-step {self.step + 1}: {err}. The inner problem diverged: lower --inner-lr (or --outer-lr) and train again"
            ) from err
        set_meta_gradients(self.theta, self.rho, res)
        loss_t, metric_t = res.loss.detach().reshape(()), torch.as_tensor(res.metric).detach().reshape(())
        if self.dist.enabled:
            # One bucketed all-reduce: the mean of the ranks' equal-share meta-gradients is
            # the meta-gradient of the whole meta-batch; the logged loss and metric likewise.
            average_gradients(list(self.theta.values()) + list(self.rho.values()))
            loss_t, metric_t = all_reduce_mean((loss_t, metric_t.to(loss_t.dtype)))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss, metric = float(loss_t), float(metric_t)
        if not math.isfinite(loss):
            raise FloatingPointError(f"meta-loss became {loss} at step {self.step + 1}; lower --outer-lr or --inner-lr")
        dt = time.perf_counter() - t0
        self.step += 1
        self.elapsed += dt
        # λ after the Adam step (the value the next meta-step uses); iMAML's statistics hold the one before it.
        lam = self.learner.lam_stats(self.rho) if self.learner.layer is not None else {}
        row = self.logs.write_step({
            **res.stats, **lam, "step": self.step, "meta_loss": loss, METRIC_COLUMN[cfg.task]: metric,
            "step_seconds": dt, "elapsed_seconds": self.elapsed, "peak_mem_mb": peak_memory_mb(self.device),
        })
        self.health.update(self.step, res.stats)
        self._announce_choices()
        return row

    def _announce_choices(self) -> None:
        """Say once which batching strategies were measured fastest (query pass, inner problems)."""
        seen = self._announced
        for key, c in self.learner.query_choices.items():
            if ("query", key) not in seen:
                seen.add(("query", key))
                self.log(f"query pass: {c['choice']} over the tasks (measured: vmap {c['vmap_s']:.3f} s, loop {c['loop_s']:.3f} s"
                         f"{'' if key[1] else ', no grad'})")
        layer = self.learner.layer
        sec = layer.diagnostics.strategy_seconds if layer is not None else None
        if sec and ("layer", tuple(sorted(sec.items()))) not in seen:
            seen.add(("layer", tuple(sorted(sec.items()))))
            assert layer is not None
            self.log(f"inner problems: {layer.diagnostics.strategy} over the tasks (measured, per gradient + Hessian "
                     f"product: " + ", ".join(f"{k} {v:.3f} s" for k, v in sec.items()) + ")")

    def validate(self) -> dict[str, Any]:
        """Evaluate θ on the fixed validation episodes; append to ``val.csv``; keep ``best.pt``."""
        assert self.val_source is not None
        cfg = self.cfg
        st = evaluate_episodes(self.learner, self.theta, self.rho, self.val_source, cfg.val_episodes,
                               cfg.eval_batch, cfg, progress=False)
        row = {"step": self.step, "elapsed_seconds": f"{self.elapsed:.2f}", "val_metric": f"{st['mean']:.6g}",
               "val_ci95": f"{st['ci95']:.6g}", "val_loss": f"{st['loss']:.6g}", "episodes": cfg.val_episodes}
        self.logs.write_validation(row, st["mean"])  # every rank evaluates the same θ; rank 0 records it
        better = self.best_val is None or (st["mean"] > self.best_val if cfg.task == "classification" else st["mean"] < self.best_val)
        if better:
            self.best_val = st["mean"]
            if self.writer:
                atomic_torch_save(self.state_dict(), self.out / BEST_NAME)
        return row

    def run(self, time_limit: float | None = None, time_budget: float | None = None) -> dict[str, Any]:
        """Train up to ``cfg.meta_steps``; with ``time_limit`` (wall-clock seconds of this call)
        or ``time_budget`` (seconds of training of the whole run, the log's
        ``elapsed_seconds``: meta-steps only, validation excluded, counted across resumes),
        stop earlier at a step boundary once it is exceeded, checkpointing there.  The budget
        is what equal-time comparisons of algorithms need."""
        cfg = self.cfg
        start = self.step
        t_start = time.perf_counter()
        stopped_by_time = False
        last: dict[str, Any] = {}
        metric_name = "acc" if cfg.task == "classification" else "mse"
        bar = tqdm(total=cfg.meta_steps, initial=start, desc=f"meta-train {cfg.algorithm}", unit="step",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        if time_budget is not None and self.elapsed >= time_budget and self.step < cfg.meta_steps:
            self.log(f"training-time budget of {time_budget:g} s already reached ({self.elapsed:.1f} s trained): "
                     f"nothing to train (meta-step {self.step})")
            bar.close()
            self.save()
            return {"step": self.step, "last": last, "checkpoint": str(self.ckpt_path), "log": str(self.csv_path),
                    "stopped_by_time_limit": True}
        try:
            while self.step < cfg.meta_steps:
                last = self.train_step()
                m = last["query_accuracy"] or last["query_mse"]
                post = {"loss": last["meta_loss"], metric_name: m}
                if last["inner_grad_ratio"]:
                    post["inner"] = last["inner_grad_ratio"]
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.meta_steps):
                    self.val_last = self.validate()["val_metric"]
                if self.val_last:
                    post["val"] = self.val_last
                bar.set_postfix(**post, refresh=False)
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.meta_steps:
                    self.save()
                if self.step == self._fault_at:
                    inject_fault(self.step, self.dist.rank)
                over_limit = time_limit is not None and time.perf_counter() - t_start > time_limit
                over_budget = time_budget is not None and self.elapsed >= time_budget
                if (over_limit or over_budget) and self.step < cfg.meta_steps:
                    stopped_by_time = True
                    if cfg.eval_every and self.step % cfg.eval_every != 0:
                        self.validate()
                    self.save()
                    what = (f"time limit of {time_limit:g} s" if over_limit
                            else f"training-time budget of {time_budget:g} s ({self.elapsed:.1f} s trained)")
                    self.log(f"{what} reached: stopped after meta-step {self.step} of {cfg.meta_steps}")
                    break
        finally:
            bar.close()
            self.logs.flush()
        if self.step == start:  # nothing to do (already trained that far): still leave a checkpoint
            self.save()
        return {"step": self.step, "last": last, "checkpoint": str(self.ckpt_path), "log": str(self.csv_path),
                "stopped_by_time_limit": stopped_by_time}

    def close(self) -> None:
        self.logs.close()
        self.lock.release()


class _NoLock:
    """The run-folder lock of a rank that writes nothing."""

    def release(self) -> None:
        pass


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, time_limit: float | None = None,
          dist_ctx: DistContext | None = None, time_budget: float | None = None) -> dict[str, Any]:
    """Meta-train ``cfg`` (continuing from ``cfg.out/checkpoint.pt`` with ``resume``).

    ``time_limit``: optional wall-clock budget in seconds for this call; ``time_budget``: optional
    budget of training seconds for the whole run (see :meth:`Trainer.run`).
    """
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, log=log, dist_ctx=dist_ctx)
    if resume:
        left = cfg.meta_steps - trainer.step
        log(f"resumed from meta-step {trainer.step} ({trainer.ckpt_path}); "
            + (f"{left} meta-steps to go" if left > 0 else f"already at or past --meta-steps {cfg.meta_steps}: nothing to train"))
    try:
        return trainer.run(time_limit=time_limit, time_budget=time_budget)
    except KeyboardInterrupt:
        raise TrainingInterrupted(trainer) from None
    finally:
        trainer.close()


class TrainingInterrupted(Exception):
    """Ctrl-C during training: says where the last (intact: writes are atomic) checkpoint is."""

    def __init__(self, trainer: Trainer) -> None:
        saved = getattr(trainer, "saved_step", None)
        if saved is None and trainer.ckpt_path.exists():
            saved = trainer.step  # a resumed run that has not saved since
        if saved is None:
            where = "no checkpoint had been written yet: run the same command again to start over"
        else:
            where = (f"the last checkpoint is {str(trainer.ckpt_path)!r} (meta-step {saved}); continue with: "
                     f"python -m applications.imaml train --dataset {trainer.cfg.dataset} --out {trainer.out} --resume")
        super().__init__(f"interrupted during meta-step {trainer.step + 1}; {where}")
