"""The reliability probes' findings: each misuse gets one clear message instead of a
misleading failure or a silently wrong result (issue 22)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import bilevel
from bilevel.solvers import GradientDescent

DT = torch.float64
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)


def _sq(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ p - y) ** 2).mean()


LAYERS = {
    "Proximal": lambda: (bilevel.Proximal(_sq, 1.0), (torch.zeros(3, dtype=DT, requires_grad=True),)),
    "Argmin": lambda: (bilevel.Argmin(lambda w, a, x, y: _sq(w, x, y) + a * (w ** 2).sum()),
                       (torch.zeros(3, dtype=DT), torch.tensor(0.5, dtype=DT, requires_grad=True))),
    "FixedPoint": lambda: (bilevel.FixedPoint(lambda z, a, x, y: 0.5 * torch.tanh(z + a + x.T @ y / 20)),
                           (torch.zeros(3, dtype=DT), torch.tensor(0.5, dtype=DT, requires_grad=True))),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_inference_mode_is_named_with_what_to_do(kind: str) -> None:
    layer, lead = LAYERS[kind]()
    with torch.inference_mode(), pytest.raises(bilevel.UnsupportedError, match=r"inference_mode.*torch\.no_grad"):
        layer(*[t.detach() for t in lead], X, Y)
    # ... and the fix it names works: under no_grad the solution comes back without a graph.
    with torch.no_grad():
        out = layer(*[t.detach() for t in lead], X, Y)
    assert not out.requires_grad


def test_an_inference_tensor_input_is_named() -> None:
    with torch.inference_mode():
        xi = X.clone()
    with pytest.raises(bilevel.UnsupportedError, match="inference tensor"):
        bilevel.Proximal(_sq, 1.0)(torch.zeros(3, dtype=DT, requires_grad=True), xi, Y)


@pytest.mark.parametrize(("batched", "label"), [(False, "args[0]"), (True, "args[0]")])
def test_an_objective_that_modifies_its_data_in_place_is_refused(batched: bool, label: str) -> None:
    def scaling_loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x.mul_(1.0)  # in place: the caller's tensor
        return _sq(p, x, y)

    x = X.clone().expand(2, 20, 3).clone() if batched else X.clone()
    y = Y.expand(2, 20).clone() if batched else Y
    layer = bilevel.Proximal(scaling_loss, 1.0, solver=GradientDescent(lr=0.1, steps=3))
    with pytest.raises(bilevel.BilevelValueError, match=re.escape(f"modified {label} in place")):
        layer(torch.zeros(3, dtype=DT, requires_grad=True), x, y, batched="vmap" if batched else False)


class _ScalingSolver:
    """A solver whose objective evaluations scale the data in place (as a buggy objective
    would) and that then reports a non-converged solve."""

    def __call__(self, objective, x0, *args, batched=False):
        objective(x0, *args)
        return bilevel.SolverResult(x=x0.clone(), status=bilevel.Status.MAX_ITERATIONS, iterations=1)


def _scaling_loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x.mul_(1.01)
    return _sq(p, x, y)


def test_the_in_place_error_comes_before_a_convergence_warning_it_caused() -> None:
    # The ConvergenceWarning (an error here) must not hide the error naming the cause.
    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.ConvergenceWarning)
        with pytest.raises(bilevel.BilevelValueError, match=re.escape("modified args[0] in place")):
            bilevel.Argmin(_scaling_loss, solver=_ScalingSolver())(torch.zeros(3, dtype=DT), X.clone(), Y)


def test_an_in_place_modification_under_torch_func_vmap_is_refused() -> None:
    # Under vmap the layer sees wrapped tensors whose version counters never move; the
    # check runs on the slices the solve saw, which share the caller's counter.
    layer = bilevel.Proximal(_scaling_loss, 1.0, solver=GradientDescent(lr=0.1, steps=2))
    xs = X.expand(2, 20, 3).clone()
    theta = torch.zeros(3, dtype=DT, requires_grad=True)
    with pytest.raises(bilevel.BilevelValueError, match=re.escape("modified args[0] in place")):
        torch.func.vmap(lambda x, y: layer(theta, x, y), in_dims=(0, None))(xs, Y)


def test_an_in_place_modification_is_named_even_when_the_solve_then_fails() -> None:
    def failing(objective, x0, *args, batched=False):
        objective(x0, *args)
        raise RuntimeError("the solver gave up")

    with pytest.raises(bilevel.BilevelValueError, match=re.escape("modified args[0] in place")) as info:
        bilevel.Argmin(_scaling_loss, solver=failing)(torch.zeros(3, dtype=DT), X.clone(), Y)
    assert "the solver gave up" in str(info.value.__context__)


def test_the_initial_point_is_not_kept_alive_by_the_layer_s_graph() -> None:
    import gc
    import weakref

    x0 = torch.zeros(3, dtype=DT)
    ref = weakref.ref(x0)
    a = torch.tensor(0.5, dtype=DT, requires_grad=True)
    out = bilevel.Argmin(lambda w, a, x, y: _sq(w, x, y) + a * (w ** 2).sum())(x0, a, X, Y)
    del x0
    gc.collect()
    assert ref() is None  # the graph (alive through out) holds the solution, not x0
    out.sum().backward()


def test_a_modified_dict_argument_is_named_by_its_key() -> None:
    def loss(w: torch.Tensor, data: dict) -> torch.Tensor:
        data["y"].add_(0.0)
        return _sq(w, data["x"], data["y"])

    data = {"x": X.clone(), "y": Y.clone()}
    with pytest.raises(bilevel.BilevelValueError, match=r"args\[0\]\['y'\] in place"):
        bilevel.Argmin(loss)(torch.zeros(3, dtype=DT), data)


def test_an_unmodified_argument_passes() -> None:
    x = X.clone()
    v = x._version
    bilevel.Proximal(_sq, 1.0)(torch.zeros(3, dtype=DT, requires_grad=True), x, Y).sum().backward()
    assert x._version == v


@pytest.mark.parametrize("batched", [False, True])
def test_a_detached_inner_loss_is_refused_not_answered_with_theta(batched: bool) -> None:
    def detached(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _sq(p.detach(), x, y)

    x, y = (X.expand(2, 20, 3), Y.expand(2, 20)) if batched else (X, Y)
    with pytest.raises(bilevel.BilevelValueError, match=r"Proximal: the inner loss does not depend on φ"):
        bilevel.Proximal(detached, 1.0)(torch.zeros(3, dtype=DT, requires_grad=True), x, y, batched=batched)


def test_an_inner_loss_that_reaches_only_a_closed_over_parameter_is_refused() -> None:
    w = torch.ones(3, dtype=DT, requires_grad=True)  # the loss depends on w, not on φ

    def wrong(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _sq(w, x, y) + 0 * p.detach().sum()

    with pytest.raises(bilevel.BilevelValueError, match="does not depend on φ"):
        bilevel.Proximal(wrong, 1.0)(torch.zeros(3, dtype=DT, requires_grad=True), X, Y)


def test_the_imaml_cli_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    from applications.imaml import cli

    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--dataset", "sinusoid", "--meta-steps", "1", "--out", str(f), "--no-progress"])
    assert info.value.code == 2
    out, err_text = capsys.readouterr()
    err = [ln for ln in err_text.splitlines() if ln.strip()]
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert "training" not in out  # refused before it announces a run
    assert f.read_text() == "x"
