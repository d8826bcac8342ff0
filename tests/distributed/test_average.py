"""``bilevel.distributed``: meta-gradient averaging over a gloo process group (2 processes)."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel.distributed import all_reduce_mean, average_gradients, world_size

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        tree = {"w": torch.full((3, 2), float(rank + 1)), "b": [torch.tensor(10.0 * rank), torch.arange(4.0) * rank]}
        mean = all_reduce_mean(tree, bucket_mb=1e-5)  # tiny buckets: several collectives
        params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)),
                  torch.nn.Parameter(torch.zeros(1))]
        params[0].grad = torch.full((5,), float(rank))
        params[1].grad = torch.full((2, 2), 2.0 * rank, dtype=torch.float64)
        if rank == 0:
            params[2].grad = torch.ones(1)  # rank 1 has no gradient for it: zeros are used
        average_gradients(params)
        torch.save({"mean": mean, "grads": [p.grad for p in params], "world": world_size()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_average_trees_and_parameter_gradients() -> None:
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "rendezvous")
        mp.spawn(_worker, args=(2, init, d), nprocs=2, join=True)
        results = [torch.load(pathlib.Path(d) / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r["world"] == 2
        torch.testing.assert_close(r["mean"]["w"], torch.full((3, 2), 1.5))
        torch.testing.assert_close(r["mean"]["b"][0], torch.tensor(5.0))
        torch.testing.assert_close(r["mean"]["b"][1], torch.arange(4.0) * 0.5)
        torch.testing.assert_close(r["grads"][0], torch.full((5,), 0.5))
        torch.testing.assert_close(r["grads"][1], torch.full((2, 2), 1.0, dtype=torch.float64))
        torch.testing.assert_close(r["grads"][2], torch.full((1,), 0.5))


def test_without_a_process_group_it_does_nothing() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    average_gradients([p])
    assert torch.equal(p.grad, torch.ones(3)) and world_size() == 1
    t = {"a": torch.arange(3.0)}
    assert torch.equal(all_reduce_mean(t)["a"], t["a"])


def _desync_worker(rank: int, world: int, init: str, out: str) -> None:
    from applications.imaml.distributed import DistContext, check_in_sync

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world=world)
        check_in_sync([torch.ones(3)], ctx, 1)  # equal: fine
        try:
            check_in_sync([torch.ones(3) * (1 + rank)], ctx, 2)
            msg = ""
        except RuntimeError as e:
            msg = str(e)
        pathlib.Path(f"{out}/{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


def test_ranks_out_of_sync_are_detected() -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_desync_worker, args=(2, "file://" + os.path.join(d, "rdv"), d), nprocs=2, join=True)
        msgs = [(pathlib.Path(d) / f"{r}.txt").read_text() for r in range(2)]
    assert all("out of sync" in m for m in msgs)
