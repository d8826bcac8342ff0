"""Meta-training on several processes with ``torchrun`` (PyTorch's own ``torch.distributed``).

``torchrun --nproc_per_node=N -m applications.imaml train ...`` takes the same arguments as
one process.  ``--meta-batch`` stays the global meta-batch: every rank draws the same
reproducible task stream and keeps its contiguous share of each meta-batch (rank r of N
takes tasks ``r·B/N … (r+1)·B/N − 1``), computes the implicit meta-gradient of its share,
and :func:`bilevel.distributed.average_gradients` averages the shares with one bucketed
all-reduce before the outer Adam step -- the mean of N equal-sized means is the mean over
the meta-batch, so the run does not depend on N (up to rounding).  Rank 0 alone writes
the log, the configuration and the checkpoints; every rank reads the checkpoint on
``--resume``.  A rank that fails brings the others down: collectives time out after
``BILEVEL_DIST_TIMEOUT`` seconds (default 300) instead of hanging forever; with
``torchrun --max-restarts=N`` the restarted group resumes from the last checkpoint
(:mod:`.elastic`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup_from_env", "shard", "shutdown"]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place: rank ``rank`` of ``world`` (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes logs and checkpoints; the others only compute."""
        return self.rank == 0


def setup_from_env(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (if any).

    Raises:
        ValueError: a launch that cannot work (a world size without a rendezvous address,
            an inconsistent rank), with what to fix -- before any collective could hang.
    """
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    world = int(env["WORLD_SIZE"])
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
            "(torchrun --nproc_per_node=N -m applications.imaml train ...), which sets the rendezvous"
        )
    rank = int(env["RANK"])
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    timeout = datetime.timedelta(seconds=float(env.get("BILEVEL_DIST_TIMEOUT", "300")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one key-value store across restarts of the group: each
            # attempt gets its own keys, else a restarted group reads the dead group's
            # addresses and fails to connect (PyTorch issue #135712).
            attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"bilevel/attempt_{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    if dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says {world}")
    return DistContext(rank=rank, world=world)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Any, ctx: DistContext) -> Any:
    """This rank's contiguous share of a meta-batch (every tensor field sliced on dim 0)."""
    if not ctx.enabled:
        return batch
    n = batch.support_x.shape[0]
    per = n // ctx.world
    lo, hi = ctx.rank * per, (ctx.rank + 1) * per
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v[lo:hi] for k, v in fields.items() if isinstance(v, torch.Tensor)})


def check_in_sync(tensors: list[torch.Tensor], ctx: DistContext, step: int) -> None:
    """Raise if the ranks' meta-parameters differ (one checksum per tensor, max vs min)."""
    if not ctx.enabled:
        return
    sums = torch.stack([t.detach().double().sum() for t in tensors])
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"meta-step {step}: the ranks' meta-parameters differ (ranks out of sync)")
