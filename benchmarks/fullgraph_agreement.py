"""Does the traced layer give the eager meta-gradient on the few-shot conv nets?

    python -m benchmarks.fullgraph_agreement [--nets app,paper] [--dtypes float64] [--inner-steps 16 --cg-steps 5]

For each net and dtype: the meta-gradient of ``benchmarks/metastep.py``'s problem (5-way
1-shot, meta-batch 4, 64 filters, its ``make_layer``: K GD steps, a fixed budget of CG
steps) through ``bilevel.Proximal(batched="vmap")`` eagerly, and through the same function
under ``torch.compile(fullgraph=True)`` (the traced layer; inductor unless ``--backend``
says otherwise); prints their relative
difference and the first compiled call's seconds (the compilation).  In float32 the inner
GD of these batch-norm ReLU nets amplifies rounding (benchmarks/README.md): float64 tells
rounding from a real mismatch.  A check, not a timing: no table of speeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.metastep import FewShotProblem, make_layer


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y**2).sum()) for y in b) ** 0.5
    return num / den


def check(net: str, dtype: str, steps: int, cg_steps: int, filters: int, backend: str = "inductor") -> str:
    p = FewShotProblem(net, "5w1s", 4, filters, steps=steps, cg_steps=cg_steps, dtype=dtype)
    layer = make_layer(p.loss, p.lam, p.steps, p.lr, p.cg_steps)
    th = [p.theta[k] for k in p.names]

    def meta_loss(theta: dict, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        phi = layer(theta, xs, ys, batched="vmap")
        return torch.vmap(p.loss)(phi, xq, yq).sum()

    eager = list(torch.autograd.grad(meta_loss(p.theta, p.xs, p.ys, p.xq, p.yq), th))
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(meta_loss, fullgraph=True, backend=backend)
    traced = list(torch.autograd.grad(compiled(p.theta, p.xs, p.ys, p.xq, p.yq), th))
    seconds = time.perf_counter() - t0
    return (f"{net} {dtype} K={steps} CG={cg_steps}: traced vs eager (vmap) relative difference "
            f"{relative_difference(traced, eager):.2e}; first call (compile) {seconds:.0f} s")


def main(argv: list[str] | None = None) -> list[str]:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--nets", default="app,paper")
    a.add_argument("--dtypes", default="float64")
    a.add_argument("--inner-steps", type=int, default=16)
    a.add_argument("--cg-steps", type=int, default=5)
    a.add_argument("--filters", type=int, default=64)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: traced, no kernels generated)")
    args = a.parse_args(argv)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    lines = []
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
        for net in args.nets.split(","):
            for dtype in args.dtypes.split(","):
                lines.append(check(net, dtype, args.inner_steps, args.cg_steps, args.filters, args.backend))
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    return lines


if __name__ == "__main__":
    main()
