"""The append-only stage store and the sharded stage runner (no models involved)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from harmaug_pl.augment.cache import (
    IncompleteStageError,
    StageStore,
    content_key,
    derive_seed,
    run_stage,
)
from harmaug_pl.backends.base import SamplingConfig
from harmaug_pl.errors import ConfigError, HarmAugError


def key(n: int) -> str:
    return content_key(item=n)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


class Recorder:
    """A placeholder compute function: value = f(item, batch seed, batch size); records every call."""

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self.fail_after_calls = fail_after_calls

    def __call__(self, items: list[int], seed: int) -> list[dict[str, Any]]:
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls.append((list(items), seed))
        return [{"item": item, "seed": seed, "batch": len(items)} for item in items]


def run(cache: Path, items: list[int], compute: Recorder, **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("seed", 11)
    return run_stage(cache, "demo", items, [key(i) for i in items], compute, **kwargs).values


# -- content keys --------------------------------------------------------------------------------


def test_content_key_is_canonical_and_sensitive() -> None:
    base = content_key(stage="generate", model={"model": "m", "dtype": "bf16"}, seed=1, input="é")
    assert base == content_key(input="é", seed=1, model={"dtype": "bf16", "model": "m"}, stage="generate")
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != content_key(stage="generate", model={"model": "m", "dtype": "bf16"}, seed=2, input="é")
    assert base != content_key(stage="generate", model={"model": "m", "dtype": "fp32"}, seed=1, input="é")
    # dataclasses (sampling settings) are keyed by their fields
    assert content_key(s=SamplingConfig(top_p=0.9)) != content_key(s=SamplingConfig(top_p=0.95))
    with pytest.raises(TypeError):
        content_key(x=object())


def test_derive_seed_depends_on_batch_content_only() -> None:
    keys = [key(1), key(2)]
    assert derive_seed(0, "s", keys) == derive_seed(0, "s", list(keys))
    assert derive_seed(0, "s", keys) != derive_seed(0, "s", keys[::-1])
    assert derive_seed(0, "s", keys) != derive_seed(1, "s", keys)
    assert 0 <= derive_seed(0, "s", keys) < 2**31


# -- the store -----------------------------------------------------------------------------------


def test_store_round_trip_merges_ranks_and_first_record_wins(tmp_path: Path) -> None:
    StageStore(tmp_path, "demo", rank=0).append([(key(1), {"v": "a"}), (key(2), {"v": "é"})])
    StageStore(tmp_path, "demo", rank=1).append([(key(2), {"v": "other"}), (key(3), {"v": "c"})])
    store = StageStore(tmp_path, "demo")
    store.refresh()
    assert len(store) == 3
    assert store.get(key(2)) == {"v": "é"}  # rank0.jsonl sorts first: first record wins
    assert store.get(key(3)) == {"v": "c"}
    # plain JSON lines, nothing else
    for line in lines(tmp_path / "demo" / "rank0.jsonl"):
        assert set(json.loads(line)) == {"key", "value"}


def test_refresh_reads_only_new_lines(tmp_path: Path) -> None:
    reader = StageStore(tmp_path, "demo")
    reader.refresh()  # no directory yet: nothing, no error
    StageStore(tmp_path, "demo").append([(key(1), {"v": 1})])
    reader.refresh()
    StageStore(tmp_path, "demo").append([(key(2), {"v": 2})])
    reader.refresh()
    assert reader.get(key(1)) == {"v": 1} and reader.get(key(2)) == {"v": 2}


def test_corrupt_and_partial_lines_are_skipped_counted_and_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StageStore(tmp_path, "demo")
    store.append([(key(1), {"v": 1})])
    path = tmp_path / "demo" / "rank0.jsonl"
    good = json.dumps({"key": key(3), "value": {"v": 3}})
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")  # corrupt complete line
        handle.write(json.dumps({"key": "../../etc/passwd", "value": {}}) + "\n")  # not a hex key
        handle.write(json.dumps({"key": key(2), "value": [1]}) + "\n")  # value is not an object
        handle.write(good[: len(good) // 2])  # a write cut by a kill
    reader = StageStore(tmp_path, "demo")
    with caplog.at_level(logging.WARNING):
        reader.refresh()
    assert len(reader) == 1 and key(3) not in reader
    assert reader.skipped_lines == 4
    assert "corrupt" in caplog.text and "unterminated" in caplog.text

    store.append([(key(4), {"v": 4})])  # truncates the partial tail first
    assert all(json.loads(line) for line in lines(path)[-1:])
    assert not path.read_text().endswith(good[: len(good) // 2] + "\n")
    fresh = StageStore(tmp_path, "demo")
    fresh.refresh()
    assert fresh.get(key(4)) == {"v": 4} and fresh.skipped_lines == 3


def test_partial_tail_without_any_newline_is_truncated_whole(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "rank0.jsonl"
    path.parent.mkdir()
    path.write_text('{"key": "ab')
    StageStore(tmp_path, "demo").append([(key(1), {"v": 1})])
    assert lines(path) == [json.dumps({"key": key(1), "value": {"v": 1}})]


def test_stage_names_and_records_are_validated(tmp_path: Path) -> None:
    for bad in ("../x", "Label", "a/b", ""):
        with pytest.raises(ConfigError, match="stage name"):
            StageStore(tmp_path, bad)
    with pytest.raises(HarmAugError, match="malformed"):
        StageStore(tmp_path, "demo").append([("../../x", {"v": 1})])
    with pytest.raises(HarmAugError, match="malformed"):
        StageStore(tmp_path, "demo").append([(key(1), ["not", "a", "dict"])])  # type: ignore[list-item]


_WRITER = """
import sys
from harmaug_pl.augment.cache import StageStore, content_key
store = StageStore(sys.argv[1], "demo", rank=0)
for n in range(40):
    store.append([(content_key(w=sys.argv[2], n=n, m=m), {"text": "x" * 5000}) for m in range(5)])
"""


def test_two_processes_appending_to_the_same_file_do_not_corrupt_it(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name], cwd=root)
        for name in ("a", "b")
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    store = StageStore(tmp_path, "demo")
    store.refresh()
    assert len(store) == 400 and store.skipped_lines == 0


def test_append_waits_for_the_file_lock(tmp_path: Path) -> None:
    store = StageStore(tmp_path, "demo")
    store.append([(key(1), {"v": 1})])
    holder = FileLock(f"{store.path}.lock")  # another process/run appending to the same file
    holder.acquire()
    writer = threading.Thread(target=store.append, args=([(key(2), {"v": 2})],))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive(), "append did not wait for the lock"
    holder.release()
    writer.join(10)
    assert len(lines(store.path)) == 2


# -- the stage runner ----------------------------------------------------------------------------


def test_runner_caches_and_computes_nothing_twice(tmp_path: Path) -> None:
    first = Recorder()
    values = run(tmp_path, list(range(7)), first)
    assert [v["item"] for v in values] == list(range(7))
    assert [items for items, _ in first.calls] == [[0, 1, 2], [3, 4, 5], [6]]
    again = Recorder()
    assert run(tmp_path, list(range(7)), again) == values
    assert again.calls == []


def test_runner_resumes_with_the_same_chunks_and_seeds(tmp_path: Path) -> None:
    reference = run(tmp_path / "ref", list(range(10)), Recorder())
    crashing = Recorder(fail_after_calls=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", list(range(10)), crashing)
    # also lose the last row of the second chunk, as if the kill had cut its line
    path = tmp_path / "run" / "demo" / "rank0.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n").rsplit("\n", 1)[1][:20])
    resumed = Recorder()
    assert run(tmp_path / "run", list(range(10)), resumed) == reference
    # chunk [3, 4, 5] is recomputed whole (same seed as before) but only row 5 is appended
    assert [items for items, _ in resumed.calls] == [[3, 4, 5], [6, 7, 8], [9]]
    assert resumed.calls[0][1] == crashing.calls[1][1]
    records = [json.loads(line)["key"] for line in lines(path)]
    assert len(records) == len(set(records)) == 10


def test_runner_shards_chunks_across_ranks(tmp_path: Path) -> None:
    single = run(tmp_path / "single", list(range(11)), Recorder())
    ranks = [Recorder(), Recorder()]
    barrier = threading.Barrier(2)
    results: dict[int, list[dict[str, Any]]] = {}

    def rank(r: int) -> None:
        results[r] = run(
            tmp_path / "ddp", list(range(11)), ranks[r], rank=r, world_size=2, barrier=barrier.wait
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == single
    assert [items for items, _ in ranks[0].calls] == [[0, 1, 2], [6, 7, 8]]
    assert [items for items, _ in ranks[1].calls] == [[3, 4, 5], [9, 10]]
    files = sorted(p.name for p in (tmp_path / "ddp" / "demo").glob("*.jsonl"))
    assert files == ["rank0.jsonl", "rank1.jsonl"]


def test_runner_reports_rows_a_dead_rank_left_missing(tmp_path: Path) -> None:
    # rank 1 of 2 finishes its chunk [3, 4, 5]; rank 0 never ran (died)
    with pytest.raises(IncompleteStageError, match="6 of 9 rows are missing") as err:
        run(tmp_path, list(range(9)), Recorder(), rank=1, world_size=2)
    assert "computes only the missing rows" in str(err.value)
    resumed = Recorder()
    assert [v["item"] for v in run(tmp_path, list(range(9)), resumed)] == list(range(9))
    assert [items for items, _ in resumed.calls] == [[0, 1, 2], [6, 7, 8]]


def test_runner_rejects_wrong_result_counts_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(HarmAugError, match="returned 1 results for a batch of 3"):
        run_stage(
            tmp_path, "demo", [1, 2, 3], [key(i) for i in (1, 2, 3)], lambda b, s: [{}], batch_size=3, seed=0
        )
    with pytest.raises(ConfigError, match="rank 2"):
        run(tmp_path, [1], Recorder(), rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        run(tmp_path, [1], Recorder(), batch_size=0)
