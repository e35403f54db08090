"""The weights loading policy: safetensors first, ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, and never the hub's safetensors-conversion service.

The DeBERTa-v3 hub repos ship only ``pytorch_model.bin``, so the GPU packs' students depend on this.
Everything runs on tiny random-init models in tmp folders and a tmp hub cache (no network).
"""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.errors import ModelLoadError
from harmaug_pl.model_loading import load_sequence_classifier, weight_format
from harmaug_pl.training.distillation import DistillationModule
from tests.test_datamodule import tiny_datamodule
from tests.test_module import Recorder, tiny_trainer
from tests.test_safe_loading import _Payload  # unpickling it would create a marker file
from tests.tiny_models import put_in_hub_cache, save_tiny_deberta


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["config.json", "model.safetensors"], "safetensors"),
        (["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"], "safetensors"),
        (["config.json", "model.safetensors", "pytorch_model.bin"], "safetensors"),  # preferred
        (["config.json", "pytorch_model.bin"], "pytorch_bin"),
        (["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"], "pytorch_bin"),
        (["config.json", "pytorch_model.bin", "model.Q4.gguf"], "pytorch_bin"),
        (["model.Q4_1.gguf"], "gguf"),
        (["config.json", "weights.pt", "model.pth", "tf_model.h5"], None),
        (["config.json", "onnx/model.safetensors", "sub/pytorch_model.bin"], None),  # top level only
        ([], None),
    ],
)
def test_weight_format_policy(names: list[str], expected: str | None) -> None:
    assert weight_format(names) == expected
    assert weight_format(iter(names)) == expected  # any iterable, e.g. a hub listing


@pytest.fixture(scope="module")
def bin_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeBERTa-v2 folder holding only pytorch_model.bin (no safetensors)."""
    return save_tiny_deberta(tmp_path_factory.mktemp("bin_student"), seed=3, weights="bin")


def test_a_bin_only_student_loads_its_own_weights_and_trains_a_step(
    bin_student: Path, tmp_path: Path
) -> None:
    assert weight_format(p.name for p in bin_student.iterdir()) == "pytorch_bin"
    saved = torch.load(bin_student / "pytorch_model.bin", weights_only=True)
    model = DistillationModule(str(bin_student), learning_rate=1e-3, warmup_steps=0)
    loaded = model.student.state_dict()
    for name, tensor in saved.items():  # the .bin's values, not a random init
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    before = model.student.classifier.weight.detach().clone()
    recorder = Recorder()
    tiny_trainer("32-true", 1, recorder).fit(model, datamodule=tiny_datamodule(tmp_path, bin_student))
    assert len(recorder.losses) == 1 and math.isfinite(recorder.losses[0])
    assert not torch.equal(model.student.classifier.weight, before)


def evil_copy(bin_student: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The .bin student with a pickle that calls ``Path.touch(marker)`` when unpickled."""
    folder = tmp_path / "evil_student"
    folder.mkdir()
    for file in bin_student.iterdir():
        if file.name != "pytorch_model.bin":
            (folder / file.name).write_bytes(file.read_bytes())
    marker = tmp_path / "bin_code_ran"
    state = torch.load(bin_student / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    return folder, marker


def test_a_bin_whose_pickle_would_call_a_function_is_refused_in_one_line(
    bin_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = evil_copy(bin_student, tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_sequence_classifier(str(folder))
    message = str(info.value)
    assert "\n" not in message and f"refused {folder / 'pytorch_model.bin'}" in message
    assert re.search(r"asks to call \S+, which torch.load\(weights_only=True\) does not allow", message)
    assert not marker.exists()

    monkeypatch.chdir(tmp_path)  # and through the CLI: one line, exit 2, no traceback
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", "cpu_tiny", "--trainer.logger=false", f"--model.init_args.student={folder}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err and not marker.exists()
    (line,) = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    assert line.startswith("harmaug: error: ModelLoadError: ") and str(folder / "pytorch_model.bin") in line


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"placeholder garbage", "Unsupported operand"),
        (b"", "EOFError"),
        (None, "failed reading zip archive"),  # None: a truncated copy of the real file
    ],
    ids=["garbage", "empty", "truncated"],
)
def test_a_damaged_bin_is_named_in_one_line(
    data: bytes | None, reason: str, bin_student: Path, tmp_path: Path
) -> None:
    folder, _ = evil_copy(bin_student, tmp_path)
    weights = folder / "pytorch_model.bin"
    weights.write_bytes((bin_student / "pytorch_model.bin").read_bytes()[:1000] if data is None else data)
    with pytest.raises(ModelLoadError) as info:
        load_sequence_classifier(str(folder))
    message = str(info.value)
    assert "\n" not in message and f"{weights} is not a readable PyTorch weights file" in message
    assert reason in message


def test_a_safetensors_folder_loads_from_safetensors_only(
    tiny_student: Path, bin_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder with both: the safetensors values load, and the .bin (a booby trap here) is never read."""
    import transformers.modeling_utils as modeling_utils

    folder, marker = evil_copy(bin_student, tmp_path)  # other weights (seed 3) + a payload in the .bin
    (folder / "model.safetensors").write_bytes((tiny_student / "model.safetensors").read_bytes())
    read: list[str] = []
    resolve = modeling_utils._get_resolved_checkpoint_files  # the files transformers goes on to read

    def recording_resolve(*args, **kwargs):
        files, metadata = resolve(*args, **kwargs)
        read.extend(Path(file).name for file in files)
        return files, metadata

    monkeypatch.setattr(modeling_utils, "_get_resolved_checkpoint_files", recording_resolve)
    model = load_sequence_classifier(str(folder))
    assert read == ["model.safetensors"] and not marker.exists()
    expected = load_file(tiny_student / "model.safetensors")
    loaded = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_a_bin_only_hub_repo_loads_from_the_cache_without_the_conversion_service(
    bin_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU packs' case (microsoft/deberta-v3-*: pytorch_model.bin only) under a hub id.

    transformers would call ``auto_conversion`` (the hub's conversion service) unless offline or
    DISABLE_SAFETENSORS_CONVERSION is set: here it believes it is online (its own offline check is
    patched) while the hub client stays offline and sockets are blocked, so any attempt shows up.
    """
    import huggingface_hub.constants
    import transformers.modeling_utils as modeling_utils

    put_in_hub_cache(tmp_path / "hub", "placeholder-org/deberta-bin-only", bin_student)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(modeling_utils, "is_offline_mode", lambda: False)
    conversions: list[tuple] = []
    monkeypatch.setattr(modeling_utils, "auto_conversion", lambda *a, **k: conversions.append(a))
    connections: list[tuple] = []

    def no_network(self: socket.socket, address: tuple) -> None:
        connections.append(address)
        raise OSError("network blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    # The control: transformers on its own starts a conversion for this repo in this setting.
    monkeypatch.delenv("DISABLE_SAFETENSORS_CONVERSION", raising=False)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained("placeholder-org/deberta-bin-only")
    _join_conversion_threads()
    assert conversions, "the test setting no longer reaches transformers' conversion call"
    conversions.clear()

    monkeypatch.delenv("DISABLE_SAFETENSORS_CONVERSION", raising=False)
    model = load_sequence_classifier("placeholder-org/deberta-bin-only")
    _join_conversion_threads()
    assert not conversions and not connections
    saved = torch.load(bin_student / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(model.state_dict()["classifier.weight"], saved["classifier.weight"])


def _join_conversion_threads() -> None:
    import threading

    for thread in threading.enumerate():
        if thread.name == "Thread-auto_conversion":
            thread.join(timeout=10)


def test_the_refusal_names_the_shard_of_a_sharded_bin(bin_student: Path, tmp_path: Path) -> None:
    import json

    folder, marker = evil_copy(bin_student, tmp_path)
    (folder / "pytorch_model.bin").unlink()
    state = torch.load(bin_student / "pytorch_model.bin", weights_only=True)
    names = sorted(state)
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save({n: state[n] for n in names[:10]}, folder / first)
    torch.save({**{n: state[n] for n in names[10:]}, "payload": _Payload(marker)}, folder / second)
    weight_map = {n: first if i < 10 else second for i, n in enumerate(names)}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=re.escape(f"refused {folder / second}")):
        load_sequence_classifier(str(folder))
    assert not marker.exists()
