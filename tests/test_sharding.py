"""Sharded augmentation: ranks that fail together, and ``harmaug augment`` on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from harmaug_pl.augment.rank_sync import PeerRankFailed, RankSync
from harmaug_pl.errors import ConfigError
from tests.helpers import KEYWORD_TEACHER, PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, keyword_teacher, write_jsonl
from tests.test_augment import SEED, FakeBackend, FakeTeacher, make_pipeline

ROOT = Path(__file__).resolve().parents[1]


class ThreadGather:
    """An all-gather between threads, standing in for torch.distributed in the fast tests."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[str | None] = [None] * world_size

    def for_rank(self, rank: int):
        def gather(status: str | None) -> list[str | None]:
            self.slots[rank] = status
            self.barrier.wait()
            statuses = list(self.slots)
            self.barrier.wait()
            return statuses

        return gather


def run_ranks(job, world_size: int = 2) -> dict[int, BaseException | None]:
    """Run ``job(rank, sync)`` on one thread per rank; each rank's exception (or None)."""
    gather = ThreadGather(world_size)
    outcome: dict[int, BaseException | None] = {}

    def rank_main(rank: int) -> None:
        sync = RankSync(rank, world_size, gather=gather.for_rank(rank))
        try:
            with sync.guard():
                job(rank, sync)
            outcome[rank] = None
        except BaseException as err:
            outcome[rank] = err

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcome) == world_size, "a rank hung"
    return outcome


def test_a_rank_failing_mid_stage_stops_the_others_at_their_barrier() -> None:
    stages_done: dict[int, int] = {0: 0, 1: 0}

    def job(rank: int, sync: RankSync) -> None:
        for stage in range(3):
            if rank == 1 and stage == 1:
                raise RuntimeError("placeholder failure in the teacher")
            stages_done[rank] += 1
            sync.barrier()

    outcome = run_ranks(job)
    assert isinstance(outcome[1], RuntimeError)
    assert isinstance(outcome[0], PeerRankFailed)
    assert "rank 1 failed: RuntimeError: placeholder failure in the teacher" in str(outcome[0])
    assert stages_done == {0: 2, 1: 1}  # rank 0 finished stage 1, then learnt of the failure


def test_a_failure_after_the_last_barrier_is_caught_by_the_closing_one() -> None:
    def job(rank: int, sync: RankSync) -> None:
        sync.barrier()
        if rank == 0:
            raise ValueError("placeholder failure while writing the snapshot")

    outcome = run_ranks(job)
    assert isinstance(outcome[0], ValueError) and isinstance(outcome[1], PeerRankFailed)
    assert "rank 0 failed: ValueError" in str(outcome[1])


def test_healthy_ranks_pass_and_one_rank_needs_no_process_group() -> None:
    assert run_ranks(lambda rank, sync: sync.barrier()) == {0: None, 1: None}
    with RankSync(0, 1).guard():
        RankSync(0, 1).barrier()
    with pytest.raises(ConfigError, match="torch.distributed is not initialised"):
        RankSync(0, 2)


def test_a_lost_ranks_rows_are_the_only_ones_recomputed(tmp_path: Path) -> None:
    """Rank 1's teacher dies mid-labelling: both ranks stop; the re-run labels only what rank 1 lost."""
    first = {0: FakeTeacher(), 1: FakeTeacher(fail_after_rows=7)}
    outcome = run_ranks(
        lambda rank, sync: make_pipeline(teacher=first[rank]).run(
            SEED, tmp_path, rank=rank, world_size=2, barrier=sync.barrier
        )
    )
    assert isinstance(outcome[1], RuntimeError) and "rank 1 failed" in str(outcome[0])
    reference = make_pipeline().run(SEED, tmp_path / "reference")
    written = sum(len(p.read_text().splitlines()) for p in (tmp_path / "label").glob("*.jsonl"))
    assert 0 < written < len(reference.rows)

    again = {0: FakeTeacher(), 1: FakeTeacher()}
    backends = {0: FakeBackend(), 1: FakeBackend()}
    results = {}

    def rerun(rank: int, sync: RankSync) -> None:
        results[rank] = make_pipeline(backends[rank], teacher=again[rank]).run(
            SEED, tmp_path, rank=rank, world_size=2, barrier=sync.barrier
        )

    assert run_ranks(rerun) == {0: None, 1: None}
    assert results[0].rows == results[1].rows == reference.rows
    assert backends[0].rows == backends[1].rows == 0  # generation was complete: nothing redone
    assert again[0].rows == 0  # rank 0 had finished its share
    assert again[1].rows == len(reference.rows) - written


# -- the real CLI on two gloo processes -----------------------------------------------------------


def fails_on_one_rank(texts: list[str]) -> list[float]:
    """A placeholder teacher that raises on the rank named by HARMAUG_TEST_FAIL_RANK."""
    if os.environ.get("LOCAL_RANK", "0") == os.environ.get("HARMAUG_TEST_FAIL_RANK"):
        raise RuntimeError(f"placeholder failure on rank {os.environ.get('LOCAL_RANK', '0')}")
    return keyword_teacher(texts)


def tiny_pack(folder: Path, tiny_llama: Path, tiny_student: Path, teacher: str) -> Path:
    seed = write_jsonl(  # beside the run folders: rows carry the seed file's path as provenance
        folder.parent / "seed.jsonl",
        [{"prompt": p, "label": 1} for p in PLACEHOLDER_UNSAFE]
        + [{"prompt": p, "label": 0} for p in PLACEHOLDER_SAFE],
    )
    backend = {
        "class_path": "harmaug_pl.TransformersBackend",
        "init_args": {"model": str(tiny_llama)},
    }
    pack = {
        "trainer": {"logger": False, "default_root_dir": str(folder / "runs")},
        "model": {"init_args": {"student": str(tiny_student)}},
        "data": {
            "init_args": {
                "data_dir": str(folder / "data"),
                "seed_data": {"path": str(seed), "hash_range": None, "label_field": "label"},
                "eval_sets": {},
                "generator": {"init_args": {"backend": backend, "num_instructions": 12, "batch_size": 3}},
                "responder": {"init_args": {"backend": backend, "batch_size": 4}},
                "teacher": {
                    "class_path": "harmaug_pl.CallableTeacher",
                    "init_args": {"function": teacher, "batch_size": 5},
                },
            }
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(pack))
    return path


def harmaug(
    folder: Path, command: str, pack: Path, *ddp: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    argv = [sys.executable, "-m", "harmaug_pl", command, "--config", "cpu_tiny", "--config", str(pack), *ddp]
    return subprocess.run(argv, cwd=folder, env=environment, capture_output=True, text=True, timeout=300)


def augment(
    folder: Path, pack: Path, *ddp: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return harmaug(folder, "augment", pack, *ddp, env=env)


DDP = ("--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2")


@pytest.mark.slow
def test_two_gloo_ranks_build_exactly_the_single_process_rows(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path
) -> None:
    runs = {}
    for name, args in (("single", ()), ("ddp", DDP)):
        folder = tmp_path / name
        folder.mkdir()
        done = augment(folder, tiny_pack(folder, tiny_llama, tiny_student, KEYWORD_TEACHER), *args)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = folder / "data"
    rows = {name: (data / "augmented.jsonl").read_text().splitlines() for name, data in runs.items()}
    assert rows["ddp"] == rows["single"] and len(rows["single"]) > len(PLACEHOLDER_SAFE + PLACEHOLDER_UNSAFE)
    for stage in ("generate", "respond", "label"):  # each rank wrote its own shard
        assert sorted(p.name for p in (runs["ddp"] / "cache" / stage).glob("*.jsonl")) == [
            "rank0.jsonl",
            "rank1.jsonl",
        ]
        assert [p.name for p in (runs["single"] / "cache" / stage).glob("*.jsonl")] == ["rank0.jsonl"]
    stats = json.loads((runs["ddp"] / "stats.json").read_text())
    assert 0 < stats["computed_generate"] < 12  # rank 0's share only


@pytest.mark.slow
def test_a_failing_rank_stops_the_other_at_once_with_its_message(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path
) -> None:
    """Rank 0 fails: Lightning's launcher watches only its children, so without the ok-flag rank 1
    would wait in the barrier until the 30-minute process-group timeout (and this test time out)."""
    folder = tmp_path / "run"
    folder.mkdir()
    pack = tiny_pack(folder, tiny_llama, tiny_student, "tests.test_sharding:fails_on_one_rank")
    started = time.perf_counter()
    done = augment(folder, pack, *DDP, env={"HARMAUG_TEST_FAIL_RANK": "0"})
    elapsed = time.perf_counter() - started
    assert done.returncode != 0
    assert "PeerRankFailed: rank 0 failed: RuntimeError: placeholder failure on rank 0" in done.stderr
    assert elapsed < 240


@pytest.mark.slow
def test_two_gloo_ranks_test_every_eval_row_exactly_once(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path
) -> None:
    """7 eval rows on 2 ranks: Lightning's DistributedSampler gives each rank 4 (one row twice). The
    report must count the 7 rows once each, as one process does, not rank 0's share nor 8 rows."""
    evals = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"prompt": p + " please", "toxicity": 1} for p in PLACEHOLDER_UNSAFE]
        + [{"prompt": p + " please", "toxicity": 0} for p in PLACEHOLDER_SAFE[:3]],
    )
    tables = {}
    for name, args in (("single", ()), ("ddp", DDP)):
        folder = tmp_path / name
        folder.mkdir()
        pack_path = tiny_pack(folder, tiny_llama, tiny_student, KEYWORD_TEACHER)
        pack = yaml.safe_load(pack_path.read_text())
        pack["data"]["init_args"]["eval_batch_size"] = 2
        pack["data"]["init_args"]["eval_sets"] = {
            "placeholder_eval": {"path": str(evals), "label_field": "toxicity", "drop_duplicates": False}
        }
        pack_path.write_text(yaml.safe_dump(pack))
        done = harmaug(folder, "test", pack_path, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        tables[name] = [line for line in done.stdout.splitlines() if line.startswith("| placeholder_eval |")]
    assert len(tables["single"]) == 2  # student and teacher (no calibrated threshold before a fit)
    for row in tables["single"]:
        assert row.split(" | ")[3:5] == ["7", "4"]  # n rows, n unsafe
    assert tables["ddp"] == tables["single"]
