"""The bad-input rows of the fault matrix that other test files do not already cover: data files,
models, verdict words, ``--ckpt_path`` checkpoints and cache records of the wrong shape.

Every fault must end in one of our errors naming the file, line/row and field (or the setting), or
in a documented, counted skip or warning; never in a traceback from inside a library. Covered
elsewhere (not repeated here): malformed JSON/JSONL/CSV/parquet, missing/renamed columns, empty
prompts in JSONL, bad label strings, non-UTF-8 bytes, too-long rows, empty files
(``tests/test_loaders.py::BAD_INPUTS``); duplicate rows (``test_duplicates_dropped_and_counted``);
a seed set without harmful rows (``tests/test_augment.py::test_exemplars_fall_back_...``); unknown
pack keys and wrong types (``tests/test_cli.py``); missing model paths and models without a chat
template (``tests/test_backends.py``); verdict words sharing a first token (``tests/test_teacher.py``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.backends import TransformersBackend
from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, DataError, ModelLoadError
from harmaug_pl.model_loading import load_causal_lm, load_sequence_classifier
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.test_augment import SEED, FakeBackend, make_pipeline

GOOD = b'{"prompt": "placeholder fine", "label": 0}\n'
DEEP = b"[" * 100_000 + b"]" * 100_000


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return make


def _parquet(table: dict[str, Any]) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        pq.write_table(pa.table(table), tmp_path / "bad.parquet")
        return tmp_path / "bad.parquet"

    return make


# name: (file maker, DataSource settings, the DataError message it must give)
BAD_DATA = {
    "deeply_nested_jsonl_line": (
        _file("bad.jsonl", GOOD + DEEP + b"\n"),
        {},
        r"bad\.jsonl, line 2: malformed JSON: nested too deeply",
    ),
    "deeply_nested_json_file": (_file("bad.json", DEEP), {}, r"bad\.json: malformed JSON: nested too deeply"),
    "binary_garbage_jsonl": (
        _file("bad.jsonl", bytes(range(256))),
        {},
        r"bad\.jsonl, line 1: malformed JSON",
    ),
    "utf16_jsonl": (
        _file("bad.jsonl", '{"prompt": "placeholder", "label": 1}\n'.encode("utf-16")),
        {},
        r"bad\.jsonl, line 1: not valid UTF-8: byte 0xff at byte offset 0",
    ),
    "scalar_jsonl_row": (
        _file("bad.jsonl", GOOD + b"42\n"),
        {},
        r"bad\.jsonl, line 2: expected an object with named fields, got int",
    ),
    "records_key_not_a_list": (
        _file("bad.json", b'{"rows": 5}'),
        {"records_key": "rows"},
        r"bad\.json: expected a JSON list of objects, got int",
    ),
    "csv_whitespace_only_prompt": (
        _file("bad.csv", b'prompt,label\nplaceholder,1\n"  \t ",0\n'),
        {},
        r"bad\.csv, line 3, field 'prompt': prompt is empty",
    ),
    "csv_repeated_header": (
        _file("bad.csv", b"prompt,prompt,label\nplaceholder a,placeholder b,1\n"),
        {},
        r"bad\.csv, line 1: the header names the column\(s\) \['prompt'\] more than once",
    ),
    "csv_field_over_the_csv_module_limit": (
        _file("bad.csv", b'prompt,label\nplaceholder,0\n"' + b"a" * 200_000 + b'",1\n'),
        {"max_chars": 300_000},
        r"bad\.csv, line 3: CSV parse error: field larger than field limit",
    ),
    "label_is_a_list": (
        _file("bad.jsonl", GOOD + b'{"prompt": "placeholder", "label": [1]}\n'),
        {},
        r"bad\.jsonl, line 2, field 'label': cannot read \[1\] as a label",
    ),
    "label_is_an_object": (
        _file("bad.jsonl", GOOD + b'{"prompt": "placeholder", "label": {"unsafe": 1}}\n'),
        {},
        r"bad\.jsonl, line 2, field 'label': cannot read \{'unsafe': 1\} as a label",
    ),
    "label_out_of_range": (
        _file("bad.jsonl", GOOD + b'{"prompt": "placeholder", "label": 2}\n'),
        {},
        r"bad\.jsonl, line 2, field 'label': cannot read 2 as a label",
    ),
    "prompt_is_a_bool": (
        _file("bad.jsonl", GOOD + b'{"prompt": true, "label": 1}\n'),
        {},
        r"bad\.jsonl, line 2, field 'prompt': expected a string, got bool True",
    ),
    "response_is_a_number": (
        _file("bad.jsonl", b'{"prompt": "placeholder", "response": 5, "label": 1}\n'),
        {"response_field": "response"},
        r"bad\.jsonl, line 1, field 'response': expected a string, got int 5",
    ),
    "parquet_float_label": (
        _parquet({"prompt": ["placeholder"], "label": [0.5]}),
        {},
        r"bad\.parquet, row 0, field 'label': cannot read 0\.5 as a label",
    ),
    "parquet_binary_prompt": (
        _parquet({"prompt": [b"caf\xe9"], "label": [1]}),
        {},
        r"bad\.parquet, row 0, field 'prompt': expected a string, got bytes",
    ),
    "parquet_list_prompt": (
        _parquet({"prompt": [["placeholder", "two"]], "label": [1]}),
        {},
        r"bad\.parquet, row 0, field 'prompt': expected a string, got list",
    ),
    "parquet_zero_rows": (
        _parquet({"prompt": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
        {},
        r"bad\.parquet: contains no rows",
    ),
    "parquet_empty_file": (_file("bad.parquet", b""), {}, r"bad\.parquet: not a readable parquet file"),
    "hash_range_keeps_nothing": (
        _file("bad.jsonl", GOOD),
        {"hash_range": [0.999999, 1.0]},
        r"bad\.jsonl: none of its 1 rows falls in hash_range \[0\.999999, 1\.0\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named_precisely(case: str, tmp_path: Path) -> None:
    make, settings, message = BAD_DATA[case]
    with pytest.raises(DataError, match=message):
        load_examples(DataSource(path=str(make(tmp_path)), **settings))


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    path = _file(
        "mixed.jsonl",
        GOOD + DEEP + b"\n" + b'{"prompt": "placeholder", "label": [1]}\n' + b'{"prompt": " "}\n',
    )(tmp_path)
    result = load_examples(DataSource(path=str(path), on_bad_row="skip"))
    assert len(result.examples) == 1
    assert result.skipped == {"malformed_json": 1, "bad_label": 1, "empty_prompt": 1}


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_eval_set_warns_that_auprc_is_undefined(
    label: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jsonl(
        tmp_path / "one_class.jsonl", [{"prompt": p, "label": label} for p in PLACEHOLDER_SAFE]
    )
    with caplog.at_level(logging.WARNING, logger="harmaug_pl.data.loaders"):
        load_examples(DataSource(path=str(path)), origin="seed")
        assert not caplog.records  # a seed set of one class is not evaluated on
        load_examples(DataSource(path=str(path), name="placeholder_eval"), origin="eval")
    (record,) = caplog.records
    assert "placeholder_eval" in record.message and "one_class.jsonl" in record.message
    assert (
        f"all 4 labelled rows have label {label}" in record.message and "AUPRC is undefined" in record.message
    )


def test_seed_prompts_all_too_long_for_exemplars() -> None:
    generator = InstructionGenerator(FakeBackend(), num_instructions=2, max_chars=10)
    seed = [GuardExample(prompt=p, label=1) for p in PLACEHOLDER_UNSAFE]
    with pytest.raises(DataError, match="longer than generator.max_chars=10; raise it"):
        generator.requests(seed)


# -- models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    [lambda data: data[:1000], lambda data: b"placeholder garbage" * 8, lambda data: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupt_safetensors_is_a_model_load_error(
    damage: Callable[[bytes], bytes], tiny_llama: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "damaged")
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelLoadError, match=r"safetensors file in .*damaged.* is corrupt or truncated"):
        load_causal_lm(str(copy))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not a valid JSON file"),
        ("{}", "Should have a `model_type` key"),
        ('{"model_type": "placeholder_arch"}', "does not recognize this architecture"),
    ],
)
def test_broken_config_is_a_model_load_error(
    config: str, message: str, tiny_student: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_student, tmp_path / "broken")
    (copy / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=rf"(?s)cannot load the weights of model .*broken.*{message}"):
        load_sequence_classifier(str(copy))


def test_empty_verdict_word_is_a_config_error(tiny_guard: Path) -> None:
    teacher = LlamaGuardTeacher(TransformersBackend(str(tiny_guard)), unsafe_word="", safe_word="safe")
    with pytest.raises(ConfigError, match="word '' encodes to no tokens"):
        teacher.score(["placeholder"], [None])
    teacher.close()


def test_multi_token_verdict_words_are_scored_by_their_first_token(tiny_guard: Path) -> None:
    """The documented rule (``_TwoWordTeacher``): only a word's first token counts."""
    backend = TransformersBackend(str(tiny_guard))
    long_word = "unsafe placeholder words"
    assert len(backend.tokenizer.encode(long_word, add_special_tokens=False)) > 1
    single = LlamaGuardTeacher(backend, unsafe_word="unsafe", safe_word="safe").score(["placeholder"], [None])
    multi = LlamaGuardTeacher(backend, unsafe_word=long_word, safe_word="safe").score(["placeholder"], [None])
    assert multi == single
    backend.close()


def test_corrupt_student_through_the_cli_is_one_line(
    tiny_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    copy = shutil.copytree(tiny_student, tmp_path / "student")
    (copy / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "cpu_tiny", "--trainer.logger=false", f"--model.init_args.student={copy}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    assert line.startswith("harmaug: error: ModelLoadError: ") and "corrupt or truncated" in line


# -- cache records that parse but do not hold what their stage writes ---------------------------------
@pytest.mark.parametrize(
    ("stage", "value"),
    [
        ("generate", {"txt": "placeholder"}),
        ("generate", {"text": 5, "seed": 1}),
        ("respond", {"text": "placeholder", "seed": "1"}),
        ("label", {"score": "high"}),
        ("label", {"score": 1.5}),
        ("label", {}),
    ],
)
def test_cache_record_of_the_wrong_shape_is_recomputed(
    stage: str, value: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = make_pipeline().run(SEED, tmp_path)
    path = tmp_path / stage / "rank0.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    lines[1] = json.dumps({"key": record["key"], "value": value})
    path.write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.WARNING, logger="harmaug_pl.augment.cache"):
        resumed = make_pipeline().run(SEED, tmp_path)
    assert resumed.rows == reference.rows
    assert resumed.stats[f"cache_skipped_lines_{stage}"] == 1 and resumed.stats[f"computed_{stage}"] == 1
    assert any("corrupt line" in r.message and str(path) in r.message for r in caplog.records)


# -- checkpoints given with --ckpt_path ---------------------------------------------------------------
def _lightning_checkpoint(path: Path) -> bytes:
    torch.save({"pytorch-lightning_version": "2", "state_dict": {"w": torch.zeros(256)}}, path)
    return path.read_bytes()


CHECKPOINTS = {
    "missing": (None, r"no such file"),
    "empty": (lambda data: b"", r"not a complete checkpoint \(0 bytes, truncated or corrupt"),
    "cut_by_a_kill": (lambda data: data[: len(data) // 2], r"not a complete checkpoint \(\d+ bytes"),
    "not_lightning": ("plain", r"a torch file but not a Lightning checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_it(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    damage, message = CHECKPOINTS[case]
    path = tmp_path / f"{case}.ckpt"
    if damage == "plain":
        torch.save({"state_dict": {}}, path)
    elif damage is not None:
        path.write_bytes(damage(_lightning_checkpoint(path)))
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", "cpu_tiny", "--trainer.logger=false", "--ckpt_path", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("harmaug: error:")]
    assert re.search(rf"ModelLoadError: --ckpt_path {re.escape(str(path))}: {message}", line), line
