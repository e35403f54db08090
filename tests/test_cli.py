"""The CLI in-process (``main([...])``): pack names, layering, interpolation, and clear errors.

Everything runs in a tmp working directory, so relative pack paths (runs/, mlruns/) land there.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.cli.packs import resolve_pack_args
from harmaug_pl.errors import ConfigError
from harmaug_pl.package_refs import PACKAGE_ROOT as PACKAGE_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["harmaug"])  # not pytest's own arguments
    return tmp_path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI expecting it to exit; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


# -- pack names ------------------------------------------------------------------------------------
def test_bare_pack_names_resolve_and_paths_win(workdir: Path) -> None:
    packs, sets = PACKAGE_DIR / "packs", PACKAGE_DIR / "callback_sets"
    assert resolve_pack_args(["fit", "--config", "cpu_tiny", "-c", "early_stopping.yaml"]) == [
        "fit", "--config", str(packs / "cpu_tiny.yaml"), "-c", str(sets / "early_stopping.yaml"),
    ]  # fmt: skip
    assert resolve_pack_args(["--config=deberta_large"]) == [f"--config={packs / 'deberta_large.yaml'}"]
    # a file of that name in the working directory, or anything with a '/', is a path: left alone
    (workdir / "cpu_tiny").write_text("seed_everything: 1\n")
    assert resolve_pack_args(["--config", "cpu_tiny", "--config", "packs/x"]) == [
        "--config", "cpu_tiny", "--config", "packs/x",
    ]  # fmt: skip
    # other arguments are left alone; an unknown bare name is a clear error listing what is shipped
    assert resolve_pack_args(["--model.init_args.alpha", "cpu_tiny"]) == [
        "--model.init_args.alpha",
        "cpu_tiny",
    ]
    with pytest.raises(ConfigError, match=r"--config no_such_pack: no such file.*shipped: .*cpu_tiny"):
        resolve_pack_args(["--config", "no_such_pack"])


def test_print_config_resolves_interpolation_layering_and_callback_sets(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    override = write_yaml(workdir / "student.yaml", {"model": {"init_args": {"student": "org/placeholder"}}})
    code, out, _ = run_cli(
        ["fit", "--config", "cpu_tiny", "--config", "early_stopping", "--config", override,
         "--model.init_args.threshold=0.3", "--print_config"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert "${" not in out
    config = yaml.safe_load(out)
    data = config["data"]["init_args"]
    assert config["model"]["init_args"]["student"] == "org/placeholder"
    assert data["tokenizer"] == "org/placeholder"  # follows the layered student
    assert data["threshold"] == config["plots"]["threshold"] == 0.3  # follows a flag given after the packs
    assert data["teacher"]["init_args"]["function"] == "profanity_check:predict_prob"  # the pack's own
    callbacks = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    assert callbacks == ["ModelCheckpoint", "EarlyStopping"]  # the set appends; the checkpoint stays
    assert config["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/auprc"


def test_unknown_pack_key_is_the_parsers_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_yaml(workdir / "bad.yaml", {"model": {"init_args": {"not_a_key": 1}}})
    code, _, err = run_cli(["fit", "--config", "cpu_tiny", "--config", bad], capsys)
    assert code != 0
    assert "not_a_key" in err and "Traceback" not in err


def test_wrong_type_names_the_key(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["fit", "--config", "cpu_tiny", "--model.init_args.alpha=abc"], capsys)
    assert code != 0
    assert '"alpha"' in err and "abc" in err and "Traceback" not in err


# -- our errors: one line, exit 2 ------------------------------------------------------------------
def assert_one_line_error(err: str, kind: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"harmaug: error: {kind}: ")
    for needle in needles:
        assert needle in lines[0]


def test_constructor_errors_become_one_line(
    workdir: Path, tiny_student: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the constructors' own errors: the preflight, which names these first, is off here (test_preflight)
    base = ["fit", "--config", "cpu_tiny", "--trainer.logger=false", "--preflight=false"]
    missing = str(workdir / "no_such_student")
    code, _, err = run_cli([*base, f"--model.init_args.student={missing}"], capsys)
    assert code == 2
    assert_one_line_error(err, "ModelLoadError", missing)

    # a DataSource setting that its own check rejects when the pack is instantiated
    bad_range = "--data.init_args.seed_data.hash_range=[0.5,0.2]"
    code, _, err = run_cli([*base, f"--model.init_args.student={tiny_student}", bad_range], capsys)
    assert code == 2
    assert_one_line_error(err, "ConfigError", "openai_moderation_seed_part", "hash_range")


def test_missing_seed_file_at_setup_is_one_line(
    workdir: Path, tiny_student: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = str(workdir / "no_such_seed.jsonl")
    code, _, err = run_cli(  # the file vanishing after the preflight (which names it first) passed
        ["fit", "--config", "cpu_tiny", "--trainer.logger=false", f"--model.init_args.student={tiny_student}",
         "--data.init_args.augment=false", f"--data.init_args.seed_data.path={seed}", "--preflight=false"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "DataUnavailable", seed, "not found")
    assert not (workdir / "runs" / "cpu_tiny" / "data" / "cache").exists()


# -- entry points ----------------------------------------------------------------------------------
def test_augment_subcommand_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "augment" in out and "fit" in out
    code, out, _ = run_cli(["augment", "--help"], capsys)
    assert code == 0 and "--data" in out and "--model" in out


def test_python_m_runs_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["harmaug_pl", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("harmaug_pl", run_name="__main__")
    assert info.value.code == 0
    assert "{fit,validate,test,predict,augment}" in capsys.readouterr().out


@pytest.mark.slow
def test_lightning_console_script() -> None:
    """The installed ``lightning`` script is ours (Lightning itself ships none), in a fresh process."""
    script = Path(sys.executable).parent / "lightning"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "{fit,validate,test,predict,augment}" in done.stdout


def test_console_scripts_exit_zero_after_a_successful_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Console scripts run ``sys.exit(entry())``: the entry must return None, not the CLI object."""
    import importlib.metadata

    import harmaug_pl.cli
    import harmaug_pl.cli.lightning_cli

    calls = []
    monkeypatch.setattr(harmaug_pl.cli.lightning_cli, "main", lambda *a, **k: calls.append(a) or object())
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name in ("harmaug", "lightning") and ep.value.startswith("harmaug_pl")
    }
    assert scripts == {"harmaug": "harmaug_pl.cli:console_main", "lightning": "harmaug_pl.cli:console_main"}
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(harmaug_pl.cli.console_main())
    assert exit_info.value.code is None and calls == [()]  # status 0
