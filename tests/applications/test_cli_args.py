"""Every command line of applications/ answers bad input with one line and exit status 2
(``prog: error: ...``), never a traceback; found by running them as a new user would."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from applications import cliargs


@pytest.mark.parametrize(("fn", "good", "bad"), [
    (cliargs.positive_int, [("3", 3), ("1e3", 1000)], ["0", "-2", "1.5", "x", "inf"]),
    (cliargs.nonneg_int, [("0", 0), ("7", 7)], ["-1", "x", "2.5"]),
    (cliargs.positive_float, [("0.5", 0.5), ("3", 3.0)], ["0", "-1", "nan", "inf", "x"]),
])
def test_argument_types(fn, good, bad) -> None:
    for text, want in good:
        assert fn(text) == want
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_output_dir_creates_or_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="prog")
    assert cliargs.output_dir(parser, tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cliargs.output_dir(parser, tmp_path / "file")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is a file, not a folder" in err
    with pytest.raises(SystemExit) as e:
        cliargs.output_dir(parser, tmp_path / "file" / "sub")
    assert e.value.code == 2 and "cannot be created" in capsys.readouterr().err


def _one_line_error(main, argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["clean", "compare", "distill", "l2"])
def test_hyperopt_bad_threads_and_out(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    from applications.hyperopt import cli

    def main(argv: list[str]) -> int:
        rc = cli.main([command, *argv])
        raise SystemExit(rc)

    _one_line_error(main, ["--threads", "0"], capsys, "--threads")
    (tmp_path / "afile").write_text("x")
    _one_line_error(main, ["--out", str(tmp_path / "afile"), "--threads", "1"], capsys, "is a file, not a folder")


def test_hyperopt_negative_seed_and_tiny_limit(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    from applications.hyperopt import distill, l2

    _one_line_error(distill.main, ["--seed", "-3"], capsys, "--seed")
    _one_line_error(l2.main, ["--seed", "-1"], capsys, "--seed")
    _one_line_error(l2.main, ["--limit", "5"], capsys, "--limit must be at least")
    _one_line_error(l2.main, ["--inner-maxiter", "0"], capsys, "--inner-maxiter")


def test_deq_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.deq import app

    for argv, match in ((["--threads", "0"], "--threads"), (["--time-limit", "nan"], "--time-limit"),
                        (["--time-limit", "-5"], "--time-limit"), (["--input-gain", "inf"], "--input-gain")):
        assert app.main([*argv, "--out", str(tmp_path / "run")]) == 2
        assert match in capsys.readouterr().err
    # --resume of a folder that does not exist leaves nothing behind.
    assert app.main(["--resume", "--out", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "missing").exists()


def test_fig2a_bad_out_and_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.experiments import fig2a

    (tmp_path / "afile").write_text("x")
    _one_line_error(fig2a.main, ["--out", str(tmp_path / "afile")], capsys, "is a file, not a folder")
    _one_line_error(fig2a.main, ["--noise", "-1"], capsys, "--noise")


@pytest.mark.parametrize(("argv", "match"), [
    (["--filters", "0"], "--filters"), (["--tasks", "0"], "--tasks"), (["--ways", "0"], "--ways"),
    (["--lanczos", "0"], "--lanczos"), (["--tight-maxiter", "0"], "--tight-maxiter"), (["--inner-lr", "-1"], "--inner-lr"),
    (["--checkpoint", "/nonexistent.pt"], "no such file"),
])
def test_metagrad_quality_bad_input(argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.experiments import metagrad_quality

    _one_line_error(metagrad_quality.main, ["--data-root", str(tmp_path), *argv], capsys, match)
    _one_line_error(metagrad_quality.main, ["--data-root", str(tmp_path / "none")], capsys, "no such folder")


def test_build_model_refuses_zero_filters() -> None:
    from applications.imaml.models import build_model

    with pytest.raises(ValueError, match="filters must be >= 1"):
        build_model("omniglot", 5, filters=0)
    assert sum(p.numel() for p in build_model("omniglot", 5, filters=8).parameters()) < 10_000


def test_imaml_help_states_the_defaults_the_configuration_uses(capsys: pytest.CaptureFixture[str]) -> None:
    """The help once said 16 inner steps of 0.1 and 5 CG steps for iMAML on Omniglot while
    the configuration used 3, 0.4 and 2."""
    from applications.imaml.cli import build_parser
    from applications.imaml.config import resolve_config

    cfg = resolve_config(dataset="omniglot", algorithm="imaml", ways=5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"imaml: sinusoid 16, omniglot {cfg.learner.inner_steps} (" in text
    assert f"omniglot {cfg.learner.inner_lr:g} (" in text
    assert f"omniglot {cfg.learner.cg_steps}, miniimagenet" in text


def test_imaml_resume_and_overwrite_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml.cli import main

    _one_line_error(main, ["train", "--dataset", "sinusoid", "--resume", "--overwrite", "--out", str(tmp_path)], capsys,
                    "pass one of them")
