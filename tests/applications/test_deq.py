"""applications/deq: a deep-equilibrium classifier trained through ``bilevel.FixedPoint``.

The implicit gradient of the model against the unrolled network's gradient at convergence,
exact resumption (after an epoch, and in the middle of one), the outputs of a run, and
bad input refused in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the DEQ application reads scikit-learn's bundled digits")
pytest.importorskip("matplotlib", reason="the DEQ application draws its curves")

from applications.deq import app  # noqa: E402
from applications.deq import model as M  # noqa: E402

SMALL = ["--width", "16", "--batch-size", "128", "--threads", "1"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _run(tmp_path: Path, *args: str) -> int:
    return app.main(["--out", str(tmp_path), *SMALL, *args])


@pytest.mark.parametrize("weight", M.WEIGHTS)
def test_implicit_gradient_equals_the_unrolled_gradient_at_convergence(weight: str) -> None:
    """At a tightly solved fixed point, the implicit gradient (Anderson forward, GMRES
    backward) equals backpropagation through enough unrolled iterations (float64)."""
    torch.manual_seed(0)
    data = M.load_digits()
    x, y = data["x_train"][:32].double(), data["y_train"][:32]
    params = {k: v.double().requires_grad_() for k, v in M.init_params(12, seed=1).items()}
    cfg = app.make_parser().parse_args(["--rtol", "1e-12", "--backward-rtol", "1e-12", "--maxiter", "2000"])
    layer = app.make_layer(cfg)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(M.classify(params, z), y)

    g_imp = torch.autograd.grad(loss(M.implicit_forward(layer, params, x, 0.9, weight)), list(params.values()))
    assert layer.diagnostics.forward.success and layer.diagnostics.backward.success
    g_unr = torch.autograd.grad(loss(M.unrolled_forward(params, x, 0.9, 400, weight)), list(params.values()))
    for a, b in zip(g_imp, g_unr):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_phantom_gradient_is_the_damped_neumann_series() -> None:
    """``--backward phantom``: k damped adjoint steps equal backpropagation through k damped
    steps ``z ← (1 − τ) z + τ f(z)`` started at the fixed point (Geng et al. 2021)."""
    torch.manual_seed(0)
    data = M.load_digits()
    x, y = data["x_train"][:16].double(), data["y_train"][:16]
    params = {k: v.double().requires_grad_() for k, v in M.init_params(10, seed=2).items()}
    k, tau = 4, 0.7
    cfg = app.make_parser().parse_args(["--rtol", "1e-12", "--maxiter", "2000", "--backward", "phantom",
                                        "--phantom-steps", str(k), "--phantom-damping", str(tau)])
    layer = app.make_layer(cfg)
    z = M.implicit_forward(layer, params, x, 0.9)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(M.classify(params, z), y), [params["V"], params["U"]])
    W, inj = M.recurrent_weight(params["V"], 0.9), M.injection(params, x)
    zz = z.detach()
    for _ in range(k):
        zz = (1 - tau) * zz + tau * M.block(zz, W, inj)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(M.classify(params, zz), y), [params["V"], params["U"]])
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_a_run_writes_its_outputs_and_learns(tmp_path: Path) -> None:
    assert _run(tmp_path, "--epochs", "2") == 0
    rows = _rows(tmp_path / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == set(app.LOG_COLUMNS)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert set(res["evaluations_to_rtol_at_trained_model"]) == {"iteration", "anderson", "broyden"}
    for name in ("curves.png", "residuals.png", "checkpoint.pt", "config.json"):
        assert (tmp_path / name).exists(), name


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["params"]


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_resume_after_an_epoch_continues_exactly(tmp_path: Path, method: str) -> None:
    extra = ["--method", method, "--unroll", "5", "--no-plots"]
    assert _run(tmp_path / "straight", "--epochs", "2", *extra) == 0
    assert _run(tmp_path / "split", "--epochs", "1", *extra) == 0
    # A finished run resumed with more epochs goes on where it stopped.
    assert app.main(["--out", str(tmp_path / "split"), *SMALL, "--epochs", "2", *extra, "--resume"]) == 0
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    la = _rows(tmp_path / "straight" / "log.csv")
    lb = _rows(tmp_path / "split" / "log.csv")
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


def test_time_limit_stops_inside_an_epoch_and_resume_is_exact(tmp_path: Path) -> None:
    extra = ["--epochs", "1", "--batch-size", "64", "--checkpoint-every", "3", "--no-plots"]
    assert app.main(["--out", str(tmp_path / "straight"), "--width", "16", "--threads", "1", *extra]) == 0
    assert app.main(["--out", str(tmp_path / "split"), "--width", "16", "--threads", "1", *extra,
                     "--time-limit", "0.2"]) == 0
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and 0 < ck["step_in_epoch"] < 21  # stopped inside the epoch
    assert app.main(["--out", str(tmp_path / "split"), "--width", "16", "--threads", "1", *extra, "--resume"]) == 0
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rho", "1.5"], "--rho must be in (0, 1)"),
        (["--phantom-damping", "0"], "--phantom-damping"),
        (["--resume"], "no checkpoint"),
        (["--resume", "--overwrite"], "exclude each other"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                          message: str) -> None:
    assert _run(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_existing_run_out_file_and_changed_settings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path / "run", "--epochs", "1", "--no-plots") == 0
    capsys.readouterr()
    assert _run(tmp_path / "run", "--epochs", "1") == 2
    assert "--resume" in capsys.readouterr().err
    assert _run(tmp_path / "run", "--epochs", "2", "--rho", "0.9", "--resume") == 2
    assert "changed settings ['rho']" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err
