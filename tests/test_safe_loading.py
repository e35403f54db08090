"""Safe loading: nothing a model, checkpoint, cache or pack holds gets executed unless a pack asks.

A guard model ends up in production paths, so these checks read the code itself (an AST scan that
fails on any new unsafe call) and attack the loaders with files that would run code if unpickled
or imported.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from harmaug_pl.augment.cache import StageStore, run_stage
from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.errors import ConfigError, HarmAugError, ModelLoadError
from harmaug_pl.model_loading import load_causal_lm, load_sequence_classifier, torch_load

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "harmaug_pl", ROOT / "benchmarks", ROOT / "scripts"]
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"load", "loads", "Unpickler", "dump", "dumps", "open"}


def unsafe_uses(tree: ast.AST) -> list[str]:
    """Calls that can run code from data: (un)pickling, torch.load without weights_only=True,
    trust_remote_code=True written into code, numpy/pandas pickle readers."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = (
            func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        )
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        keywords = {k.arg: k.value for k in node.keywords}
        if owner in UNSAFE_MODULES and name in UNSAFE_CALLS:
            found.append(f"line {node.lineno}: {owner}.{name}")
        if owner == "torch" and name == "load":  # one place may: model_loading.torch_load (torch >= 2.6)
            found.append(f"line {node.lineno}: torch.load (call harmaug_pl.model_loading.torch_load)")
        if name == "read_pickle" or (
            isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is True
        ):
            found.append(f"line {node.lineno}: pickle reader {name}")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


def test_no_code_path_unpickles_or_trusts_remote_code() -> None:
    problems = {}
    for folder in SCANNED:
        for path in folder.rglob("*.py") if folder.is_dir() else []:
            uses = unsafe_uses(ast.parse(path.read_text(), filename=str(path)))
            if uses:
                problems[str(path.relative_to(ROOT))] = uses
    helper = problems.pop("harmaug_pl/model_loading.py", [])
    assert len(helper) == 1 and "torch.load" in helper[0], helper  # torch_load, the one place
    assert not problems, problems


def test_the_scan_catches_what_it_looks_for() -> None:
    bad = (
        "import pickle, torch, numpy as np\npickle.loads(b'')\ntorch.load('a')\n"
        "torch.load('a', weights_only=False)\nnp.load('a', allow_pickle=True)\n"
        "f(trust_remote_code=True)\ntorch.load('a', weights_only=True)\n"
    )
    assert len(unsafe_uses(ast.parse(bad))) == 6


def test_torch_load_refuses_a_torch_whose_weights_only_is_unsafe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert torch_load(path)["w"].tolist() == [0.0, 0.0]
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ModelLoadError, match="older than 2.6.*CVE-2025-32434"):
        torch_load(path)


def test_loading_a_model_leaves_the_environment_as_it_was(
    tiny_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISABLE_SAFETENSORS_CONVERSION", raising=False)
    load_sequence_classifier(str(tiny_student))
    assert "DISABLE_SAFETENSORS_CONVERSION" not in os.environ  # it was set only while loading


def test_no_shipped_pack_turns_on_remote_code() -> None:
    for pack in (ROOT / "harmaug_pl" / "packs").glob("*.yaml"):
        assert "trust_remote_code: true" not in pack.read_text().lower(), pack.name


def remote_code_model(tiny_llama: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny Llama plus an ``auto_map`` to a modeling file that leaves a marker when imported."""
    model = shutil.copytree(tiny_llama, tmp_path / "remote_code_model")
    marker = tmp_path / "remote_code_ran"
    (model / "modeling_placeholder.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as PlaceholderModel\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_placeholder.PlaceholderModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_model_code_runs_only_when_asked_and_then_with_a_warning(
    tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    # Remote code registers its class for the auto class process-wide (LlamaConfig -> it, and
    # LlamaForCausalLM._auto_class): undo that after the test, or later save_pretrained calls of
    # tiny Llamas try to copy "custom code" and fail depending on test order.
    mapping = AutoModelForCausalLM._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    monkeypatch.setattr(LlamaForCausalLM, "_auto_class", LlamaForCausalLM._auto_class)
    model, marker = remote_code_model(tiny_llama, tmp_path)
    with caplog.at_level(logging.WARNING, logger="harmaug_pl.model_loading"):
        load_causal_lm(str(model))
    assert not marker.exists() and not caplog.records  # the shipped Python file was ignored
    with caplog.at_level(logging.WARNING, logger="harmaug_pl.model_loading"):
        load_causal_lm(str(model), trust_remote_code=True)
    assert marker.exists()
    assert any("trust_remote_code=True" in r.message and str(model) in r.message for r in caplog.records)


class _Payload:
    """Unpickling this would create ``path``: the proof that a loader ran code from a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "checkpoint_code_ran"
    checkpoint = tmp_path / "placeholder.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, checkpoint)
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", "cpu_tiny", "--trainer.logger=false", "--data.init_args.augment=false",
              "--ckpt_path", str(checkpoint)])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and not marker.exists()
    (line,) = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    assert re.search(r"ModelLoadError: refused to load the checkpoint .* the Python object '\S+'", line)


def test_cache_is_json_only_and_ignores_a_pickle_planted_in_it(tmp_path: Path) -> None:
    marker = tmp_path / "cache_code_ran"
    stage_dir = tmp_path / "cache" / "label"
    stage_dir.mkdir(parents=True)
    (stage_dir / "rank9.jsonl").write_bytes(pickle.dumps(_Payload(marker)) + b"\n")
    result = run_stage(
        tmp_path / "cache", "label", ["a", "b"], ["a" * 64, "b" * 64],
        lambda items, seed: [{"text": item} for item in items], batch_size=2, seed=0,
    )  # fmt: skip
    assert [v["text"] for v in result.values] == ["a", "b"] and result.skipped_lines >= 1
    assert not marker.exists()
    for line in (stage_dir / "rank0.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"key", "value"}


@pytest.mark.parametrize("stage", ["../escape", "/abs", "label/../../x", "Label", "a.b", ""])
def test_cache_paths_cannot_leave_the_cache_dir(stage: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid cache stage name"):
        StageStore(tmp_path / "cache", stage)
    store = StageStore(tmp_path / "cache", "label")
    for key in ("../../etc/passwd", "A" * 64, "a" * 63):
        with pytest.raises(HarmAugError, match="malformed record"):
            store.append([(key, {"score": 0.5})])
    assert not any(p for p in tmp_path.rglob("*") if "cache" not in p.parts)


def test_a_pack_cannot_build_python_objects_from_yaml_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "yaml_code_ran"
    pack = tmp_path / "tagged.yaml"
    pack.write_text(f"seed_everything: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "cpu_tiny", "--config", str(pack), "--print_config"])
    assert info.value.code != 0 and "could not determine a constructor" in capsys.readouterr().err
    assert not marker.exists()


def test_nothing_pickled_ships_in_the_package() -> None:
    pickled = {".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".joblib", ".npy"}
    shipped = [p.name for p in (ROOT / "harmaug_pl").rglob("*") if p.suffix in pickled]
    assert not shipped, shipped
