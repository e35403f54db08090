"""`harmaug check` and the automatic preflight: every row computed offline from a filled HF cache.

The cache (tests/fake_hub_cache.py) holds the shipped packs' models under their real ids with fake
weight files, so a passing check proves that nothing read weights; a socket guard proves that
nothing went to the network.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from harmaug_pl.cli import run_verb
from harmaug_pl.cli.lightning_cli import main, parse_config
from harmaug_pl.preflight import CheckRow, memory
from harmaug_pl.preflight.automatic import automatic_check
from harmaug_pl.preflight.hub import HubLookup
from harmaug_pl.preflight.runner import Preflight
from harmaug_pl.preflight.table import format_table
from tests import fake_hub_cache

HUB_PACKS = ["deberta_large", "consumer_24gb", "multi_gpu", "cpu_laptop", "edge"]
GPU_PACKS = {"deberta_large": 80, "multi_gpu": 80, "consumer_24gb": 24}
FAKE_VLLM = Path(__file__).parent / "fake_vllm_pkg"
MILD_ROWS = [{"prompt": "placeholder request", "response": "placeholder answer", "label": 0}]


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    fake_hub_cache.fill(root)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every socket connect or name lookup is recorded and refused."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model's weights fails the test (the fake weight files would fail anyway)."""
    from transformers import PreTrainedModel

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the preflight loaded a model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["harmaug"])
    return tmp_path


@pytest.fixture
def offline_cache(
    filled_cache: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_network: list[Any],
    no_weights: None,
) -> Path:
    """The filled caches, offline; a GPU box's environment: fake vllm importable, the HarmBench file there."""
    monkeypatch.setenv("HF_HUB_CACHE", str(filled_cache / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(filled_cache / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    (workdir / "data").mkdir()
    (workdir / "data" / "harmbench_classifier_val.jsonl").write_text(json.dumps(MILD_ROWS[0]) + "\n")
    return filled_cache


def gpus(monkeypatch: pytest.MonkeyPatch, gib: float, count: int = 1) -> None:
    device = memory.Device("NVIDIA test GPU", int(gib * memory.GIB), int(gib * memory.GIB))
    monkeypatch.setattr(memory, "visible_gpus", lambda: [device] * count)


def rows_of(config: dict[str, Any], **kwargs: Any) -> list[CheckRow]:
    return Preflight(config, **kwargs).run()


def blockers(rows: list[CheckRow]) -> list[CheckRow]:
    return [row for row in rows if row.status == "blocker"]


def the_row(rows: list[CheckRow], what: str, subject_part: str = "") -> CheckRow:
    found = [row for row in rows if row.what == what and subject_part in row.subject]
    assert len(found) == 1, format_table(rows)
    return found[0]


@pytest.fixture(scope="module")
def packs() -> dict[str, dict[str, Any]]:
    """Every shipped pack parsed once by the CLI's own parser (layering, interpolation)."""
    names = ["cpu_tiny", *HUB_PACKS]
    return {name: parse_config(["--config", name]) for name in names}


# -- the shipped packs pass on a filled cache ------------------------------------------------------
@pytest.mark.parametrize("name", HUB_PACKS)
def test_shipped_pack_passes_on_the_filled_cache(
    name: str,
    packs: dict[str, dict[str, Any]],
    offline_cache: Path,
    no_network: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if name in GPU_PACKS:
        gpus(monkeypatch, GPU_PACKS[name])
    preflight = Preflight(packs[name])
    rows = preflight.run()
    assert not [row for row in rows if row.status != "ok"], format_table(rows)
    assert not no_network and preflight.hub.requests == 0
    checked = {row.what for row in rows}
    expected = {
        "model",
        "weights",
        "chat template",
        "verdict tokens",
        "max length",
        "memory: student",
        "memory: generator",
        "memory: responder",
        "memory: teacher",
        "data",
        "writable",
        "free disk",
    }
    assert expected <= checked, sorted(checked)
    if name in GPU_PACKS:
        assert {"CUDA", "extra"} <= checked
    student = the_row(rows, "weights", "student")
    if "deberta" in student.subject:  # the DeBERTa-v3 repos hold only pytorch_model.bin
        assert "pytorch_model.bin only" in student.detail


def test_rows_carry_the_real_arithmetic(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimates are the pack headers' arithmetic, from the real-shaped configs."""
    gpus(monkeypatch, 80)
    rows = rows_of(packs["deberta_large"])
    assert "435M params x 16 B = 6.5 GiB" in the_row(rows, "memory: student").detail
    assert "relative positions" in the_row(rows, "max length").detail  # 1024 is fine for DeBERTa-v3
    teacher = the_row(rows, "memory: teacher").detail
    assert "0.85 x 80.0 GiB = 68.0 GiB" in teacher and "weights 15.0 GiB" in teacher  # 8.03B x 2 B
    assert "weights 4.7 GiB" in the_row(rows, "memory: generator").detail  # gemma 2.51B x 2 B
    assert "'unsafe' -> " in the_row(rows, "verdict tokens").detail
    gpus(monkeypatch, 24)
    rows = rows_of(packs["consumer_24gb"])
    teacher = the_row(rows, "memory: teacher").detail
    assert "bfloat16 quantized: weights 5.2 GiB" in teacher  # NF4 linears + bf16 embeddings and head
    assert "KV cache 8 x 2049 tokens 2.0 GiB" in teacher


def test_cpu_tiny_passes_on_this_machine(packs: dict[str, dict[str, Any]], workdir: Path) -> None:
    rows = rows_of(packs["cpu_tiny"], quick=True)
    assert not blockers(rows), format_table(rows)
    assert the_row(rows, "weights", "generator").detail.startswith("GGUF file")


# -- one failing pack per row, each with its own message --------------------------------------------
def edit(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = config
    for key in path:
        node = node[key]
    node[last] = value
    return config


LLM = "data.init_args.{}.init_args.backend.init_args.model"


def test_uncached_model_offline_is_a_blocker_naming_the_fix(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 80)
    rows = rows_of(edit(packs["deberta_large"], "model.init_args.student", "org/not-cached"))
    row = the_row(rows, "model", "org/not-cached")
    assert (
        row.status == "blocker" and "holds nothing of it" in row.detail and "HF_HUB_OFFLINE=1" in row.detail
    )
    assert "hf download org/not-cached" in row.fix and "model.init_args.student" in row.fix


def test_weights_in_no_accepted_format(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpus(monkeypatch, 80)
    folder = tmp_path / "flax_only"
    folder.mkdir()
    (folder / "config.json").write_text(fake_hub_cache.deberta_v3(64, 2, 2).to_json_string())
    (folder / "flax_model.msgpack").write_bytes(fake_hub_cache.FAKE_WEIGHTS)
    row = the_row(
        rows_of(edit(packs["deberta_large"], "model.init_args.student", str(folder))), "weights", "student"
    )
    assert row.status == "blocker" and "no weights the loading policy accepts" in row.detail
    assert "flax_model.msgpack" in row.detail


def test_interrupted_sharded_download_is_a_blocker(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpus(monkeypatch, 80)
    snapshot = next((offline_cache / "hub" / "models--meta-llama--Llama-Guard-3-8B" / "snapshots").iterdir())
    partial = tmp_path / "partial"
    shutil.copytree(snapshot, partial)
    (partial / "model-00003-of-00004.safetensors").unlink()
    rows = rows_of(edit(packs["deberta_large"], LLM.format("teacher"), str(partial)))
    row = the_row(rows, "weights", "teacher")
    assert row.status == "blocker" and "shards missing: model-00003-of-00004.safetensors" in row.detail


def test_tokenizer_without_chat_template(
    packs: dict[str, dict[str, Any]], offline_cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "base_lm"
    fake_hub_cache.saved_files(fake_hub_cache.QWEN_05B, folder)
    fake_hub_cache.chat_tokenizer(None, folder)
    (folder / "model.safetensors").write_bytes(fake_hub_cache.FAKE_WEIGHTS)
    config = edit(packs["cpu_laptop"], LLM.format("generator"), str(folder))
    row = the_row(rows_of(config), "chat template", "generator")
    assert row.status == "blocker" and "has no chat template" in row.detail
    assert "chat_template" in row.fix


def test_verdict_words_with_one_first_token(packs: dict[str, dict[str, Any]], offline_cache: Path) -> None:
    config = edit(packs["cpu_laptop"], "data.init_args.teacher.init_args.unsafe_word", "safety")
    row = the_row(rows_of(config), "verdict tokens")
    assert row.status == "blocker" and "start with the same token" in row.detail
    assert "unsafe_word / safe_word" in row.fix
    config = edit(packs["cpu_laptop"], "data.init_args.teacher.init_args.unsafe_word", "unsafely")
    row = the_row(rows_of(config), "verdict tokens")
    assert row.status == "warn" and "scored by their first one" in row.detail


def test_max_length_past_absolute_positions(packs: dict[str, dict[str, Any]], workdir: Path) -> None:
    rows = rows_of(edit(packs["cpu_tiny"], "data.init_args.max_length", 1024), quick=True)
    row = the_row(rows, "max length")
    assert row.status == "blocker" and "1024 > the student's 512 absolute position embeddings" in row.detail
    assert "max_length <= 512" in row.fix


def test_missing_harmbench_file_and_uncached_hub_dataset(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 80)
    (Path("data") / "harmbench_classifier_val.jsonl").unlink()
    shutil.rmtree(offline_cache / "datasets" / "walledai___xs_test", ignore_errors=True)
    try:
        rows = rows_of(packs["deberta_large"])
    finally:
        fake_hub_cache.put_dataset(offline_cache / "datasets", "walledai___xs_test", "default", ["test"])
    harmbench = the_row(rows, "data", "eval set harmbench")
    assert (
        harmbench.status == "blocker"
        and "file not found: data/harmbench_classifier_val.jsonl" in harmbench.detail
    )
    assert "docs/evaluation.md" in harmbench.fix
    xstest = the_row(rows, "data", "eval set xstest")
    assert xstest.status == "blocker" and "not in the datasets cache" in xstest.detail
    assert "eval_sets.xstest.path" in xstest.fix
    split = the_row(
        rows_of(edit(packs["deberta_large"], "data.init_args.eval_sets.toxicchat.split", "dev")),
        "data",
        "toxicchat",
    )
    assert split.status == "blocker" and "without split 'dev'" in split.detail


def test_unreachable_eval_set_is_a_warning_when_the_pack_skips_it(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 80)
    (Path("data") / "harmbench_classifier_val.jsonl").unlink()
    skipping = edit(packs["deberta_large"], "data.init_args.unavailable_eval_sets", "skip")
    harmbench = the_row(rows_of(skipping), "data", "eval set harmbench")
    assert harmbench.status == "warn" and "the run skips it" in harmbench.detail
    seed = edit(skipping, "data.init_args.seed_data.path", "data/absent_seed.jsonl")  # seed data still stops
    assert the_row(rows_of(seed), "data", "seed data").status == "blocker"


def test_missing_extras(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    missing = {"vllm", "bitsandbytes", "onnxruntime"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    gpus(monkeypatch, 80)
    for pack, package in [
        ("deberta_large", "vllm"),
        ("consumer_24gb", "bitsandbytes"),
        ("edge", "onnxruntime"),
    ]:
        row = the_row(rows_of(packs[pack]), "extra", package)
        assert row.status == "blocker" and f"'{package}' package is not installed" in row.detail, pack
        assert "pip install 'harmaug-pl[" in row.fix


def test_gpu_pack_without_cuda_and_too_many_devices(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "visible_gpus", lambda: [])
    rows = rows_of(packs["deberta_large"])
    cuda = the_row(rows, "CUDA")
    assert cuda.status == "blocker" and "no CUDA GPU visible" in cuda.detail and "vLLM" in cuda.subject
    gpus(monkeypatch, 80, count=2)
    row = the_row(rows_of(edit(packs["multi_gpu"], "trainer.devices", 8)), "devices")
    assert row.status == "blocker" and "8 GPUs asked for, 2 visible" in row.detail


def test_stage_that_does_not_fit_the_gpu(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 16)
    rows = rows_of(packs["deberta_large"])
    teacher = the_row(rows, "memory: teacher")
    assert teacher.status == "blocker" and "holds weights 15.0 GiB" in teacher.detail
    assert "gpu_memory_utilization" in teacher.fix
    student = the_row(rows, "memory: student")
    assert student.status == "blocker" and "gradient_checkpointing" in student.fix
    gpus(monkeypatch, 6)  # consumer_24gb's transformers stages: 4.7 GiB of bf16 gemma + a full batch of KV
    rows = rows_of(packs["consumer_24gb"])
    row = the_row(rows, "memory: generator")
    assert row.status == "warn" and "~5.8 GiB of 6.0 GiB" in row.detail and "batch_size" in row.fix


def test_disk_and_directories(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 80)
    Path("blocked").write_text("a file where a directory should go")
    rows = rows_of(edit(packs["deberta_large"], "data.init_args.data_dir", "blocked/data"))
    row = the_row(rows, "writable", "data_dir")
    assert row.status == "blocker" and "is a file" in row.detail and "data.init_args.data_dir" in row.fix
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6)
    )
    row = the_row(rows_of(packs["deberta_large"]), "free disk")
    assert row.status == "blocker" and "1 MiB free" in row.detail and "checkpoints" in row.subject


def test_bad_backend_setting(
    packs: dict[str, dict[str, Any]], offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, 24)
    key = "data.init_args.teacher.init_args.backend.init_args.quantization"
    rows = rows_of(edit(packs["consumer_24gb"], key, {"load_in_4bits": True}))
    row = the_row(rows, "settings")
    assert row.status == "blocker" and "load_in_4bits" in row.detail


# -- what other backends and teachers contribute ---------------------------------------------------
class EndpointBackend:
    """A stand-in for a backend harmaug-pl does not ship (e.g. a remote endpoint)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def preflight_rows(self) -> list[CheckRow]:
        if "broken" in self.url:
            raise RuntimeError("a bug in the check")
        return [CheckRow("endpoint", self.url, "blocker", "connection refused", "start the server")]


class SilentBackend:
    def __init__(self, url: str) -> None:
        self.url = url


def test_components_contribute_rows(packs: dict[str, dict[str, Any]], workdir: Path) -> None:
    def with_backends(class_name: str, url: str) -> dict[str, Any]:
        node = {"class_path": f"tests.test_preflight.{class_name}", "init_args": {"url": url}}
        config = edit(packs["cpu_tiny"], "data.init_args.generator.init_args.backend", node)
        return edit(config, "data.init_args.responder.init_args.backend", node)

    rows = rows_of(with_backends("EndpointBackend", "http://gpu:8000/v1"), quick=True)
    assert the_row(rows, "endpoint").fix == "start the server"  # one row for the two stages sharing it
    rows = rows_of(with_backends("EndpointBackend", "http://broken"), quick=True)
    assert "preflight_rows() raised RuntimeError" in the_row(rows, "component", "generator").detail
    rows = rows_of(with_backends("SilentBackend", "http://gpu:8000/v1"), quick=True)
    assert "has no preflight_rows()" in the_row(rows, "component", "responder").detail


# -- the hub, when reachable (answers faked; nothing leaves the machine) ------------------------------
def test_hub_answers_are_read_and_one_failure_stops_further_requests(
    offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    class Sibling:
        def __init__(self, name: str) -> None:
            self.rfilename = name

    class Info:
        def __init__(self, gated: Any, *names: str) -> None:
            self.gated, self.siblings = gated, [Sibling(name) for name in names]

    answers = {
        "org/open": Info(False, "config.json", "model.safetensors"),
        "org/gated": Info("manual", "config.json"),
    }
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, timeout=None: answers[repo_id])

    def metadata(url: str, timeout: float | None = None) -> Any:
        response = type("Response", (), {"headers": {}, "status_code": 403, "request": None})()
        raise GatedRepoError("gated", response=response)

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", metadata)
    hub = HubLookup(offline=False)
    source = hub.model("org/open", "model.init_args.student")
    assert (
        source.resolved
        and source.files == ["config.json", "model.safetensors"]
        and source.where.startswith("hub")
    )
    gated = hub.model("org/gated", "model.init_args.student")
    assert not gated.resolved and "not been granted access" in (gated.problem or "")
    assert "https://huggingface.co/org/gated" in (gated.fix or "")

    def unreachable(self: Any, repo_id: str, timeout: float | None = None) -> Any:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    hub = HubLookup(offline=False)
    for repo in ("org/a", "org/b", "org/c"):
        source = hub.model(repo, "x")
        assert (
            "unreachable (ConnectionError: no route to host)" in (source.problem or "") and source.transient
        )
    assert hub.requests == 1


def hub_error(status: int) -> Exception:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    response = httpx2.Response(
        status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/absent")
    )
    kind = RepositoryNotFoundError if status == 404 else HfHubHTTPError
    return kind(f"{status} from the hub", response=response)


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        ("timeout", "warn"),
        ("connect", "warn"),
        (503, "warn"),
        (429, "warn"),
        (404, "blocker"),
        ("offline", "blocker"),
    ],
)
def test_a_hub_failure_the_load_retries_is_a_warning_not_a_blocker(
    failure: Any,
    status: str,
    packs: dict[str, dict[str, Any]],
    offline_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blip on one rank must not stop the launch: huggingface_hub retries these when it loads."""
    import httpx2
    from huggingface_hub import HfApi

    raised = {
        "timeout": httpx2.ConnectTimeout("timed out"),
        "connect": httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
    }.get(failure) or (hub_error(failure) if isinstance(failure, int) else None)

    def lookup(self: Any, repo_id: str, timeout: float | None = None) -> Any:
        raise raised  # type: ignore[misc]

    monkeypatch.setattr(HfApi, "model_info", lookup)
    config = edit(packs["cpu_tiny"], "model.init_args.student", "org/absent")
    row = the_row(rows_of(config, quick=True, offline=failure == "offline"), "model", "org/absent")
    assert row.status == status, row
    assert ("the load retries" in row.detail) == (status == "warn"), row.detail


# -- `harmaug check` as typed --------------------------------------------------------------------
def run_check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_verb(["check", *args])
    out, err = capsys.readouterr()
    return info.value.code or 0, out + err


@pytest.mark.slow
def test_check_cpu_tiny_exits_0(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(["--config", "cpu_tiny"], capsys)
    assert code == 0, out
    assert "0 blocker(s)" in out and "chat template" in out  # the full check reads the GGUF tokenizer


@pytest.mark.parametrize("name", HUB_PACKS)
def test_hub_pack_offline_without_cache_exits_2(
    name: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_network: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "empty-hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / "empty-datasets"))
    code, out = run_check(["--config", name, "--offline"], capsys)
    assert code == 2 and not no_network
    config = parse_config(["--config", name])
    data = config["data"]["init_args"]
    hub_models = {
        data["teacher"]["init_args"]["backend"]["init_args"]["model"],
        data["generator"]["init_args"]["backend"]["init_args"]["model"],
    }
    for model in hub_models:
        assert any(line.startswith("BLOCKER  model") and model in line for line in out.splitlines()), out
    assert "hf download" in out and "not asked: HF_HUB_OFFLINE=1" in out


def test_check_json_help_and_overrides(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(
        ["--config", "cpu_tiny", "--quick", "--json", "--data.init_args.max_length", "1024"], capsys
    )
    report = json.loads(out)
    assert code == 2 and "1 blocker(s)" in report["summary"]
    assert any(row["what"] == "max length" and row["status"] == "blocker" for row in report["rows"])
    code, out = run_check(["--help"], capsys)
    assert code == 0 and "harmaug check" in out and "--offline" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "harmaug check --config" in capsys.readouterr().out


# -- the automatic part --------------------------------------------------------------------------
def test_fit_stops_before_the_student_loads(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import harmaug_pl.training.distillation
    from harmaug_pl.errors import ModelLoadError

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError("the student was loaded")

    monkeypatch.setattr(harmaug_pl.training.distillation, "load_sequence_classifier", refuse)
    bad_eval = "--data.init_args.eval_sets.openai_moderation_heldout.path=nowhere/eval.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "cpu_tiny", bad_eval])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "the student was loaded" not in err
    assert "PreflightError: 1 blocker(s) would stop this fit" in err and "nowhere/eval.jsonl" in err
    assert "BLOCKER  data" in err and "\nok " not in err  # problems only, not the full table

    for flags in (["--preflight=false"], []):  # skipped by the option, then by the variable
        if not flags:
            monkeypatch.setenv("HARMAUG_PREFLIGHT", "0")
        with pytest.raises(SystemExit):
            main(["fit", "--config", "cpu_tiny", bad_eval, *flags])
        assert "the student was loaded" in capsys.readouterr().err


def test_automatic_part_is_silent_when_clean(
    packs: dict[str, dict[str, Any]], workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    automatic_check(packs["cpu_tiny"], "fit")
    assert capsys.readouterr().err == ""
    rows = rows_of(packs["cpu_tiny"], command="test", quick=True)
    assert not any(row.subject.startswith(("generator", "seed")) for row in rows)  # test uses neither


def test_vllm_cpu_build_needs_no_cuda_and_is_sized_against_host_ram(
    packs: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu_vllm (device: cpu): no CUDA row, the GGUF copy planned, weights + KV cache against RAM; the
    KV cache from VLLM_CPU_KVCACHE_SPACE when set (it wins in vLLM). A GPU pack (device: cuda) still
    asks for CUDA with vLLM's CPU build installed."""
    import importlib.util

    from harmaug_pl.preflight import environment_checks

    monkeypatch.setattr(environment_checks, "installed_build", lambda: "cpu")
    monkeypatch.setattr(memory, "visible_gpus", lambda: [])
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = parse_config(["--config", "cpu_vllm"])
    rows = rows_of(config, command="fit")
    assert not [row for row in rows if row.what == "CUDA"], format_table(rows)
    vllm_missing = ["extra"] if importlib.util.find_spec("vllm") is None else []  # the venv without it
    assert [row.what for row in blockers(rows)] == vllm_missing, format_table(rows)
    generator = the_row(rows, "memory: generator")
    assert "vLLM CPU engine" in generator.detail and "KV cache 1.0 GiB (cpu_kv_cache_gb)" in generator.detail
    assert any(row.what == "weights" and "converted once to safetensors" in row.detail for row in rows)

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(int(2 * memory.host_memory().total / memory.GIB)))
    too_big = the_row(rows_of(config, command="fit"), "memory: generator")
    assert too_big.status == "blocker" and "(VLLM_CPU_KVCACHE_SPACE)" in too_big.detail

    cuda = the_row(rows_of(packs["deberta_large"]), "CUDA")
    assert cuda.status == "blocker" and "on vLLM" in cuda.subject
