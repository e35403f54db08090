"""SIGKILL at a random point of each augmentation stage, then re-run: nothing lost, duplicated or redone.

The killed run is a real subprocess (the placeholder fake models of ``tests.test_augment``, slowed
down so the kill lands inside the chosen stage); the test polls that stage's cache file and kills
once it holds a random number of records. The re-run happens in-process with counting models, so
the test can prove that only the rows the kill left missing are computed. Two runs sharing one
cache directory at the same time are checked here too (the cache's file lock at work).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from harmaug_pl.augment.pipeline import AugmentationResult
from harmaug_pl.data.loaders import DataSource
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.training.datamodule import HarmAugDataModule
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.test_augment import ROOT, SEED, FakeBackend, FakeTeacher, make_pipeline

STAGES = ("generate", "respond", "label")
BATCH_SIZES = {"generate": 4, "respond": 3, "label": 5}  # those of make_pipeline and FakeTeacher

_RUN = """
import json, sys
from pathlib import Path
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.test_augment import SEED, FakeBackend, FakeTeacher, make_pipeline
delay = float(sys.argv[2])
result = make_pipeline(FakeBackend(delay=delay), FakeBackend("fake-responder", delay=delay),
                       FakeTeacher(delay=delay)).run(SEED, Path(sys.argv[1]))
print(json.dumps([row.to_dict() for row in result.rows]))
"""


def start_run(cache: Path, delay: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(cache), str(delay)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def records(cache: Path, stage: str) -> list[bytes]:
    """The complete lines of a stage's cache file (an unterminated tail is a write cut by the kill)."""
    path = cache / stage / "rank0.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines()


def chunk_rows_to_redo(keys: list[str], present: set[str], batch_size: int) -> int:
    """Rows the runner must send to the model: every chunk with a missing key is computed whole."""
    chunks = [keys[j : j + batch_size] for j in range(0, len(keys), batch_size)]
    return sum(len(chunk) for chunk in chunks if any(key not in present for key in chunk))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AugmentationResult]:
    cache = tmp_path_factory.mktemp("reference")
    return cache, make_pipeline().run(SEED, cache)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_in_each_stage_then_rerun_redoes_only_the_missing_rows(
    stage: str, reference: tuple[Path, AugmentationResult], tmp_path: Path
) -> None:
    ref_cache, ref = reference
    ref_keys = {s: [json.loads(line)["key"] for line in records(ref_cache, s)] for s in STAGES}
    for s in STAGES:  # one record per item, in item order: the test can name each chunk's keys
        assert len(ref_keys[s]) == len(set(ref_keys[s])) > BATCH_SIZES[s], s
    total = len(ref_keys[stage])
    kill_after = random.randrange(1, total - BATCH_SIZES[stage])
    note = f"stage {stage}, kill after {kill_after} of {total} records"

    work = tmp_path / "work"
    proc = start_run(work, delay=0.05)
    deadline = time.monotonic() + 120
    while len(records(work, stage)) < kill_after:
        assert proc.poll() is None, f"{note}: the run ended first: {proc.communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, note
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = {s: [json.loads(line)["key"] for line in records(work, s)] for s in STAGES}
    assert 0 < len(left[stage]) < total, note  # the kill landed inside the stage
    assert not any(left[s] for s in STAGES[STAGES.index(stage) + 1 :]), note

    # a partial write: cut the last complete record in half, as a kill during write() leaves it
    path = work / stage / "rank0.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\n") + 1][:-30])
    left[stage].pop()

    backends = {"generate": FakeBackend(), "respond": FakeBackend("fake-responder")}
    teacher = FakeTeacher()
    resumed = make_pipeline(backends["generate"], backends["respond"], teacher).run(SEED, work)

    assert resumed.rows == ref.rows, note
    for s in STAGES:  # byte for byte the uninterrupted run's cache: nothing lost, nothing twice
        assert (work / s / "rank0.jsonl").read_bytes() == (ref_cache / s / "rank0.jsonl").read_bytes(), s
        present = set(left[s])
        assert resumed.stats[f"computed_{s}"] == len(ref_keys[s]) - len(present), f"{note}: {s}"
        assert resumed.stats[f"cached_{s}"] == len(present), f"{note}: {s}"
        redo = chunk_rows_to_redo(ref_keys[s], present, BATCH_SIZES[s])
        counted = teacher.rows if s == "label" else backends[s].rows
        assert counted == redo, f"{note}: {s} computed {counted} rows, expected {redo}"
    # the cut record was detected (counted, warned about), recomputed, and the file repaired
    assert resumed.stats[f"cache_skipped_lines_{stage}"] == 1


def test_two_runs_sharing_one_cache_dir_both_get_the_right_rows(
    reference: tuple[Path, AugmentationResult], tmp_path: Path
) -> None:
    ref_cache, ref = reference
    shared = tmp_path / "shared"
    procs = [start_run(shared, delay=0.01) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()[-2000:]
        assert json.loads(out) == [row.to_dict() for row in ref.rows]
    for stage in STAGES:
        text = (shared / stage / "rank0.jsonl").read_text()
        assert text.endswith("\n")
        parsed = [json.loads(line) for line in text.splitlines()]  # every line whole, none interleaved
        values: dict[str, dict] = {}
        for record in parsed:  # a key both runs computed is written twice, with the same value
            assert values.setdefault(record["key"], record["value"]) == record["value"], stage
        reference_records = {
            json.loads(line)["key"]: json.loads(line)["value"] for line in records(ref_cache, stage)
        }
        assert values == reference_records, stage


def test_two_runs_writing_the_set_snapshot_at_once_neither_fails(tmp_path: Path) -> None:
    """Both runs of a shared data_dir end by writing augmented.jsonl; neither may crash or leave half."""
    module = HarmAugDataModule(
        tokenizer="unused", seed_data=DataSource(path="unused.jsonl"), teacher=FakeTeacher(), augment=False,
        data_dir=str(tmp_path),
    )  # fmt: skip
    rows = [GuardExample(prompt=f"placeholder {i} " * 20) for i in range(2000)]
    errors: list[BaseException] = []

    def write() -> None:
        for _ in range(5):
            try:
                module._write_snapshot(rows)
            except BaseException as err:  # collected for the assertion below
                errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    written = (tmp_path / "augmented.jsonl").read_text().splitlines()
    assert [GuardExample.from_dict(json.loads(line)) for line in written] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["augmented.jsonl", "stats.json"]  # no temp left


def augment_pack(workdir: Path, llm: Path, seed: Path) -> Path:
    """``harmaug augment`` with the tiny random LLM as generator and responder, keyword teacher."""
    backend = {"class_path": "harmaug_pl.TransformersBackend", "init_args": {"model": str(llm)}}
    sampling = {"max_new_tokens": 12}
    pack = {
        "trainer": {"logger": False},
        "data": {
            "init_args": {
                "data_dir": str(workdir / "data"),
                "seed_data": {"path": str(seed), "label_field": "label", "hash_range": None},
                "generator": {
                    "init_args": {"backend": backend, "num_instructions": 48, "batch_size": 2, "min_words": 1,
                                  "sampling": sampling}
                },
                "responder": {"init_args": {"backend": backend, "batch_size": 2, "sampling": sampling}},
                "teacher": {"class_path": "harmaug_pl.CallableTeacher",
                            "init_args": {"function": "tests.helpers:keyword_teacher"}},
            }
        },
    }  # fmt: skip
    path = workdir / "augment.yaml"
    path.write_text(yaml.safe_dump(pack))
    return path


@pytest.mark.slow
def test_harmaug_augment_killed_in_generate_resumes_to_the_same_set(tiny_llama: Path, tmp_path: Path) -> None:
    """The real CLI and the real transformers backend: sampling after a resume equals an uninterrupted run."""
    seed = write_jsonl(
        tmp_path / "seed.jsonl",
        [{"prompt": p, "label": 1} for p in PLACEHOLDER_UNSAFE]
        + [{"prompt": p, "label": 0} for p in PLACEHOLDER_SAFE],
    )
    runs = {}
    for name in ("reference", "resumed"):
        workdir = tmp_path / name
        workdir.mkdir()
        runs[name] = (workdir, augment_pack(workdir, tiny_llama, seed))
    command = [sys.executable, "-m", "harmaug_pl", "augment", "--config", "cpu_tiny", "--config"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    workdir, pack = runs["reference"]
    finished = subprocess.run([*command, str(pack)], cwd=workdir, env=env, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]

    workdir, pack = runs["resumed"]
    proc = subprocess.Popen([*command, str(pack)], cwd=workdir, env=env, stderr=subprocess.PIPE)
    cache = workdir / "data" / "cache"
    kill_after = random.randrange(2, 40)
    deadline = time.monotonic() + 240
    while len(records(cache, "generate")) < kill_after:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(records(cache, "generate"))
    assert done < 48, f"killed after {done} records: too late"
    finished = subprocess.run([*command, str(pack)], cwd=workdir, env=env, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]

    reference_dir, resumed_dir = runs["reference"][0] / "data", workdir / "data"
    assert (resumed_dir / "augmented.jsonl").read_bytes() == (reference_dir / "augmented.jsonl").read_bytes()
    stats = json.loads((resumed_dir / "stats.json").read_text())
    assert stats["computed_generate"] == 48 - done and stats["cached_generate"] == done
