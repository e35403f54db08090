"""A checkpoint and a pack that disagree on the category head: one line naming what to set, never
torch's state_dict error (docs/categories.md, "Checkpoints and packs").

The checkpoints are real ones, written by ``harmaug fit`` on the tiny student: one without the head
(``category_weight: 0``), one with it, and "an older run": the headless one with the category settings
taken out of its hyperparameters, as checkpoints written before categories existed are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.deploy.export import from_checkpoint
from harmaug_pl.errors import ConfigError
from harmaug_pl.training.distillation import DistillationModule
from tests.test_training_resume import training_pack


def pack(workdir: Path, student: Path, name: str, category_weight: float | None, epochs: int = 1) -> Path:
    """The KD-only tiny pack with the OpenAI taxonomy's head at ``category_weight``; None: a pack
    without categories at all (neither the model nor the data module names a taxonomy)."""
    path = training_pack(workdir, student, name)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_epochs"] = epochs
    if category_weight is not None:
        config["model"]["init_args"].update(category_weight=category_weight, categories="openai_moderation")
        config["data"]["init_args"]["categories"] = "openai_moderation"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_student: Path) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("checkpoint_categories")
    found = {}
    for name, weight in (("headless", 0.0), ("head", 1.0)):
        main(["fit", "--config", str(pack(workdir, tiny_student, name, weight))])
        found[name] = workdir / name / "ckpt" / "epoch=0.ckpt"
    older = torch.load(found["headless"], map_location="cpu", weights_only=True)
    for key in ("category_weight", "categories"):
        del older["hyper_parameters"][key]
    found["older"] = workdir / "older.ckpt"
    torch.save(older, found["older"])
    return found


def error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "state_dict" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    return line


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["test", "fit"])
def test_an_older_checkpoint_with_a_head_pack_names_the_checkpoint_and_the_option(
    verb: str,
    checkpoints: dict[str, Path],
    tiny_student: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(pack(tmp_path, tiny_student, "use", 1.0, epochs=2))  # fit: resume into a second epoch
    line = error_line(capsys, verb, "--config", config, "--ckpt_path", str(checkpoints["older"]))
    assert re.fullmatch(
        rf"harmaug: error: ConfigError: checkpoint {re.escape(str(checkpoints['older']))} has no category "
        r"head .* \(model\.category_weight 1\.0\): set --model\.category_weight 0 to use it without "
        r"categories",
        line,
    ), line
    if verb == "test":  # the option it names works
        older = str(checkpoints["older"])
        cli = main([verb, "--config", config, "--ckpt_path", older, "--model.category_weight", "0"])
        assert cli.model.category_head is None


@pytest.mark.slow
def test_a_checkpoint_with_categories_off_uses_its_own_setting_over_the_pack(
    checkpoints: dict[str, Path], tiny_student: Path, tmp_path: Path
) -> None:
    """LightningCLI reads the model's settings from --ckpt_path: its category_weight 0 wins."""
    config = str(pack(tmp_path, tiny_student, "use", 1.0))
    cli = main(["test", "--config", config, "--ckpt_path", str(checkpoints["headless"])])
    assert cli.model.category_head is None and cli.model.hparams.category_weight == 0.0


@pytest.mark.slow
def test_a_head_checkpoint_loads_its_head_or_names_the_data_setting_it_needs(
    checkpoints: dict[str, Path], tiny_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a pack with the taxonomy but the head off: the checkpoint's head and taxonomy are used
    off = str(pack(tmp_path, tiny_student, "off", 0.0))
    cli = main(["test", "--config", off, "--ckpt_path", str(checkpoints["head"])])
    saved = torch.load(checkpoints["head"], map_location="cpu", weights_only=True)["state_dict"]
    assert cli.model.category_head is not None
    assert torch.equal(cli.model.category_head.linear.weight, saved["category_head.linear.weight"])
    # a pack without categories: its batches cannot feed the head
    plain = str(pack(tmp_path, tiny_student, "plain", None, epochs=2))
    for verb in ("test", "fit"):
        line = error_line(capsys, verb, "--config", plain, "--ckpt_path", str(checkpoints["head"]))
        assert "the model's category head is over 8 categories" in line, line
        assert "data module gives none: set --data.categories openai_moderation" in line, line


@pytest.mark.slow
def test_export_of_an_older_checkpoint_has_no_categories_and_python_loading_names_the_mismatch(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    guard = from_checkpoint(str(checkpoints["older"]), tmp_path / "guard", max_length=32)
    assert guard.categories is None and not (tmp_path / "guard" / "harmaug_categories.json").exists()
    with pytest.raises(ConfigError, match=r"holds a category head \(8 categories\) but this run builds none"):
        DistillationModule.load_from_checkpoint(checkpoints["head"], category_weight=0.0, weights_only=True)
