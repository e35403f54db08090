"""Seed/eval loaders: every format, column mapping, label parsing, and located errors for bad input.

All texts are mild test placeholders.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harmaug_pl.data.loaders import DataSource, load_examples, prompt_hash_fraction
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.package_refs import resolve_package_path

SAFE = "how do I bake placeholder bread"
UNSAFE = "write a rude joke about placeholder people"
ROWS: list[dict[str, Any]] = [
    {"prompt": SAFE, "response": "Mix flour and water.", "label": 0},
    {"prompt": UNSAFE, "response": None, "label": 1},
    {"prompt": "  tell me a placeholder story ", "response": "", "label": "unsafe"},
]
EXPECTED = [(SAFE, "Mix flour and water.", 0), (UNSAFE, None, 1), ("  tell me a placeholder story ", None, 1)]
OAI_REF = "pkg://harmaug_pl/resources/openai_moderation_eval.json"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets`' cache of local test files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _source_for(fmt: str, tmp_path: Path) -> DataSource:
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
        return DataSource(path=str(tmp_path / "d.json"), response_field="response")
    if fmt == "jsonl":
        return DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), response_field="response")
    if fmt == "csv":
        return DataSource(path=str(write_csv(tmp_path / "d.csv", ROWS)), response_field="response")
    if fmt == "parquet":
        columns = {k: [r[k] for r in ROWS] for k in ("prompt", "response")}
        pd.DataFrame({**columns, "label": ["0", "1", "unsafe"]}).to_parquet(tmp_path / "d.parquet")
        return DataSource(path=str(tmp_path / "d.parquet"), response_field="response")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    return DataSource(hf_name="json", data_files=[str(tmp_path / "d.jsonl")], response_field="response")


@pytest.mark.parametrize(
    ("fmt", "rows", "key"),
    [
        ("json", [0, 1, 2], "file"),
        ("jsonl", [1, 2, 3], "file"),
        ("csv", [2, 3, 4], "file"),
        ("parquet", [0, 1, 2], "file"),
        ("hf", [0, 1, 2], "dataset"),
    ],
)
def test_each_format_round_trips(fmt: str, rows: list[int], key: str, tmp_path: Path, hf_cache: None) -> None:
    result = load_examples(_source_for(fmt, tmp_path), origin="eval")
    assert [(e.prompt, e.response, e.label) for e in result.examples] == EXPECTED
    assert [e.provenance["row"] for e in result.examples] == rows
    assert key in result.examples[0].provenance
    assert {e.source for e in result.examples} == {"eval"}
    assert result.skipped == {}


def test_file_does_not_fix_text_and_empty_response_is_none(tmp_path: Path) -> None:
    rows = [
        {"prompt": " a placeholder question \n", "response": "   "},
        {"prompt": "x", "response": " kept as is "},
    ]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    source = DataSource(path=path, response_field="response", label_field=None)
    examples = load_examples(source).examples
    assert [(e.prompt, e.response, e.label) for e in examples] == [
        (" a placeholder question \n", None, None),
        ("x", " kept as is ", None),
    ]


def test_column_mapping_and_label_strings(tmp_path: Path) -> None:
    labels = ["unsafe", "Safe", " TRUE ", "no", "toxic", "non-toxic", "harmful", "unharmful", "benign"]
    labels += ["1.0", True, 0.0]
    rows = [{"user_input": f"placeholder question {i}", "toxicity": lab} for i, lab in enumerate(labels)]
    path = str(write_jsonl(tmp_path / "m.jsonl", rows))
    source = DataSource(path=path, prompt_field="user_input", label_field="toxicity")
    assert [e.label for e in load_examples(source).examples] == [1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0]


def test_label_map_adds_and_overrides(tmp_path: Path) -> None:
    labels = ["Borderline", 2, "safe", "1"]
    rows = [{"prompt": f"placeholder {i}", "label": lab} for i, lab in enumerate(labels)]
    source = DataSource(
        path=str(write_jsonl(tmp_path / "l.jsonl", rows)), label_map={"borderline": 1, "2": 1, "safe": 1}
    )
    assert [e.label for e in load_examples(source).examples] == [1, 1, 1, 1]


def test_missing_label_is_none_unless_required(tmp_path: Path) -> None:
    prompts = ["placeholder a", "placeholder b", "placeholder c"]
    pd.DataFrame({"prompt": prompts, "label": [1.0, math.nan, 0.0]}).to_parquet(tmp_path / "n.parquet")
    examples = load_examples(DataSource(path=str(tmp_path / "n.parquet"))).examples
    assert [e.label for e in examples] == [1, None, 0]
    with pytest.raises(DataError, match=r"n\.parquet, row 1, field 'label': label is missing"):
        load_examples(DataSource(path=str(tmp_path / "n.parquet"), require_label=True))


def test_json_object_with_records_key(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"meta": {}, "data": ROWS}), encoding="utf-8")
    assert len(load_examples(DataSource(path=str(path), records_key="data")).examples) == 3
    with pytest.raises(DataError, match=r"o\.json: the top level is an object, so set records_key.*'data'"):
        load_examples(DataSource(path=str(path)))


def test_format_override(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.txt", ROWS)
    assert len(load_examples(DataSource(path=str(path), format="jsonl")).examples) == 3


def _bytes(content: bytes, name: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(content)
        return tmp_path / name

    return make


def _parquet(columns: dict[str, list[Any]]) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        pd.DataFrame(columns).to_parquet(tmp_path / "bad.parquet")
        return tmp_path / "bad.parquet"

    return make


GOOD = b'{"prompt": "placeholder fine", "label": 0}\n'
BAD_INPUTS = {
    "malformed_jsonl_line": (
        _bytes(GOOD + GOOD.replace(b"0", b"1") + b'{"prompt": "x", "label": \n', "bad.jsonl"),
        {},
        r"bad\.jsonl, line 3: malformed JSON at column \d+",
    ),
    "malformed_json_file": (
        _bytes(b'[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]', "bad.json"),
        {},
        r"bad\.json, line 3, column \d+: malformed JSON",
    ),
    "missing_column_csv": (
        _bytes(b"user_input,label\nplaceholder,0\n", "bad.csv"),
        {},
        r"bad\.csv: column\(s\) not found: prompt_field='prompt'; columns present: \['user_input', 'label'\]",
    ),
    "missing_column_parquet": (
        _parquet({"prompt": ["placeholder"], "toxicity": [1]}),
        {},
        r"bad\.parquet: column\(s\) not found: label_field='label'; "
        r"columns present: \['prompt', 'toxicity'\]",
    ),
    "label_field_typo_jsonl": (
        _bytes(b'{"prompt": "placeholder", "toxicity": 1}\n', "bad.jsonl"),
        {"label_field": "toxicty"},
        r"bad\.jsonl: column\(s\) not found: label_field='toxicty'; "
        r"columns present: \['prompt', 'toxicity'\]",
    ),
    "empty_prompt": (
        _bytes(GOOD + b'{"prompt": "   ", "label": 0}\n', "bad.jsonl"),
        {},
        r"bad\.jsonl, line 2, field 'prompt': prompt is empty",
    ),
    "missing_prompt_key": (
        _bytes(GOOD + b'{"text": "placeholder", "label": 0}\n', "bad.jsonl"),
        {},
        r"bad\.jsonl, line 2, field 'prompt': field missing \(fields present: \['label', 'text'\]\)",
    ),
    "non_string_prompt": (
        _bytes(b'[{"prompt": "placeholder"}, {"prompt": 42}]', "bad.json"),
        {"label_field": None},
        r"bad\.json, row 1, field 'prompt': expected a string, got int 42",
    ),
    "not_an_object": (
        _bytes(GOOD + b'["placeholder", 0]\n', "bad.jsonl"),
        {},
        r"bad\.jsonl, line 2: expected an object with named fields, got list",
    ),
    "bad_label": (
        _bytes(GOOD + b'{"prompt": "placeholder", "label": "maybe"}\n', "bad.jsonl"),
        {},
        r"bad\.jsonl, line 2, field 'label': cannot read 'maybe' as a label; accepted .*unsafe.*label_map",
    ),
    "bad_label_csv": (
        _bytes(b"prompt,label\nplaceholder,0\nplaceholder two,0.5\n", "bad.csv"),
        {},
        r"bad\.csv, line 3, field 'label': cannot read '0\.5'",
    ),
    "non_utf8_jsonl": (
        _bytes(GOOD + b'{"prompt": "caf\xe9", "label": 0}\n', "bad.jsonl"),
        {},
        rf"bad\.jsonl, line 2: not valid UTF-8: byte 0xe9 at byte offset {len(GOOD) + 15} \(column 16\)",
    ),
    "non_utf8_csv": (
        _bytes(b'prompt,label\nplaceholder,0\n"multi\nline",1\ncaf\xe9,1\n', "bad.csv"),
        {},
        r"bad\.csv, line 5, field 'prompt': not valid UTF-8: byte 0xe9 at character 3",
    ),
    "non_utf8_json": (
        _bytes(b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}\n]', "bad.json"),
        {"label_field": None},
        r"bad\.json, line 3: not valid UTF-8: byte 0xe9 at byte offset \d+",
    ),
    "too_long": (
        _bytes(GOOD + b'{"prompt": "placeholder placeholder", "label": 0}\n', "bad.jsonl"),
        {"max_chars": 20},
        r"bad\.jsonl, line 2, field 'prompt': 23 characters, more than max_chars=20",
    ),
    "required_label_missing": (
        _bytes(GOOD + b'{"prompt": "placeholder", "label": null}\n', "bad.jsonl"),
        {"require_label": True},
        r"bad\.jsonl, line 2, field 'label': label is missing or null and require_label is true",
    ),
    "csv_field_count": (
        _bytes(b"prompt,label\nplaceholder,0\nplaceholder,1,extra\n", "bad.csv"),
        {},
        r"bad\.csv, line 3: has 3 fields but the header has 2",
    ),
    "csv_parse_error": (
        _bytes(b'prompt,label\nplaceholder,0\n"unterminated,1\n', "bad.csv"),
        {},
        r"bad\.csv, line \d+: CSV parse error",
    ),
    "corrupt_parquet": (
        _bytes(b"PAR1 this is not really parquet", "bad.parquet"),
        {},
        r"bad\.parquet: not a readable parquet file",
    ),
    "empty_jsonl": (_bytes(b"\n\n", "bad.jsonl"), {}, r"bad\.jsonl: contains no rows"),
    "empty_csv": (_bytes(b"", "bad.csv"), {}, r"bad\.csv: empty CSV file \(no header row\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_precisely(case: str, tmp_path: Path) -> None:
    make, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(DataError, match=message):
        load_examples(DataSource(path=str(make(tmp_path)), **kwargs))


def test_file_not_found_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.jsonl: file not found \(looked at .*nowhere\.jsonl\)"):
        load_examples(DataSource(path=str(tmp_path / "nowhere.jsonl")))


def test_unreachable_hub_dataset_names_it() -> None:
    source = DataSource(hf_name="placeholder-org/no-such-guard-set", hf_config="cfg", split="test")
    with pytest.raises(
        DataError,
        match=r"dataset 'placeholder-org/no-such-guard-set' config 'cfg' split 'test': could not load.*"
        r"hub may be unreachable.*set path: to a local",
    ):
        load_examples(source)


def test_skip_mode_counts_reasons_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        GOOD,  # line 1 kept
        b'{"prompt": "", "label": 0}\n',  # 2 empty_prompt
        b"{oops\n",  # 3 malformed_json
        b'{"prompt": "placeholder b", "label": "maybe"}\n',  # 4 bad_label
        b'{"prompt": "caf\xe9"}\n',  # 5 not_utf8
        GOOD,  # 6 duplicate of line 1
        b'{"prompt": "placeholder c", "label": "unsafe"}\n',  # 7 kept
        b'{"prompt": "placeholder d", "label": "maybe"}\n',  # 8 bad_label
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="harmaug_pl.data.loaders"):
        source = DataSource(path=str(tmp_path / "mixed.jsonl"), on_bad_row="skip", name="mixed set")
        result = load_examples(source)
    assert [(e.prompt, e.label, e.provenance["row"]) for e in result.examples] == [
        ("placeholder fine", 0, 1),
        ("placeholder c", 1, 7),
    ]
    assert result.skipped == {
        "empty_prompt": 1,
        "malformed_json": 1,
        "bad_label": 2,
        "not_utf8": 1,
        "duplicate": 1,
    }
    assert len(caplog.records) == 1
    warning = caplog.records[0].getMessage()
    assert "mixed set" in warning and "mixed.jsonl" in warning and "dropped 6 of 8 rows" in warning
    assert "bad_label: 2" in warning and "line 2, field 'prompt' (empty_prompt)" in warning
    assert "line 3 (malformed_json)" in warning


def test_skip_mode_still_fails_when_nothing_is_usable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "", "label": 0}, {"prompt": " ", "label": 1}])
    with pytest.raises(DataError, match=r"all_bad\.jsonl: none of its 2 rows is usable \(empty_prompt: 2\)"):
        load_examples(DataSource(path=str(path), on_bad_row="skip"))


def test_duplicates_dropped_and_counted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "placeholder", "response": "r", "label": 1},
        {"prompt": "placeholder", "response": "r", "label": 1},
        {"prompt": "placeholder", "response": "other", "label": 0},
        {"prompt": "placeholder", "response": "r", "label": 0},
    ]
    path = str(write_jsonl(tmp_path / "dup.jsonl", rows))
    result = load_examples(DataSource(path=path, response_field="response"))
    assert [(e.response, e.provenance["row"]) for e in result.examples] == [("r", 1), ("other", 3)]
    assert result.skipped == {"duplicate": 2}
    kept = load_examples(DataSource(path=path, response_field="response", drop_duplicates=False))
    assert len(kept.examples) == 4 and kept.skipped == {}


def test_hash_range_splits_disjointly_and_completely(tmp_path: Path) -> None:
    rows = [{"prompt": f"placeholder question {i}", "label": i % 2} for i in range(400)]
    rows.append({"prompt": "placeholder question 7  ", "label": 1})  # same prompt up to whitespace as row 7
    path = str(write_jsonl(tmp_path / "all.jsonl", rows))
    seed = load_examples(DataSource(path=path, hash_range=(0.0, 0.3))).examples
    held_out = load_examples(DataSource(path=path, hash_range=(0.3, 1.0)), origin="eval").examples
    seed_rows = {e.provenance["row"] for e in seed}
    eval_rows = {e.provenance["row"] for e in held_out}
    assert not seed_rows & eval_rows
    assert seed_rows | eval_rows == set(range(1, 402))
    assert 0.2 < len(seed) / 401 < 0.4
    assert (8 in seed_rows) == (401 in seed_rows)  # whitespace variants land together
    assert prompt_hash_fraction("placeholder") == prompt_hash_fraction("placeholder")
    assert 0.0 <= prompt_hash_fraction("placeholder") < 1.0


def test_limit_keeps_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": f"placeholder {i}"} for i in range(10)])
    examples = load_examples(DataSource(path=str(path), limit=3, label_field=None)).examples
    assert [e.prompt for e in examples] == ["placeholder 0", "placeholder 1", "placeholder 2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"exactly one of 'path'.*and 'hf_name'"),
        ({"path": "a.jsonl", "hf_name": "x"}, r"exactly one of"),
        ({"path": "a.txt"}, r"a\.txt: cannot tell the file format.*set format:"),
        ({"path": "a.jsonl", "hf_config": "c"}, r"hf_config only apply with hf_name"),
        ({"path": "a.jsonl", "hash_range": (0.5, 0.2)}, r"hash_range must be \[lo, hi\]"),
        ({"path": "a.jsonl", "label_map": {"maybe": 2}}, r"label_map values must be 0 or 1"),
        ({"path": "a.jsonl", "label_field": None, "require_label": True}, r"require_label is true but"),
        ({"path": "a.jsonl", "max_chars": 0}, r"max_chars must be positive"),
    ],
)
def test_inconsistent_settings_fail_early(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataSource(**kwargs)


def test_package_paths_resolve_without_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "placeholder_pkg_no_import"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    write_jsonl(package / "data" / "rows.jsonl", ROWS)
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = "pkg://placeholder_pkg_no_import/data/rows.jsonl"
    assert resolve_package_path(ref) == package / "data" / "rows.jsonl"
    dotted = "pkg://placeholder_pkg_no_import.data/rows.jsonl"
    assert resolve_package_path(dotted) == package / "data" / "rows.jsonl"
    assert "placeholder_pkg_no_import" not in sys.modules
    assert len(load_examples(DataSource(path=ref)).examples) == 3
    with pytest.raises(DataError, match=r"'pkg://placeholder_pkg_no_import/data/nope\.jsonl': no such file"):
        resolve_package_path("pkg://placeholder_pkg_no_import/data/nope.jsonl")
    with pytest.raises(DataError, match=r"'pkg://placeholder_absent_pkg/x\.json'.*is not installed"):
        resolve_package_path("pkg://placeholder_absent_pkg/x.json")
    with pytest.raises(DataError, match=r"malformed package reference"):
        resolve_package_path("pkg://placeholder_pkg_no_import/../etc/x.json")


def test_shipped_openai_moderation_set() -> None:
    """The package's own copy: 1680 prompts, 522 unsafe, 10 exact duplicate prompts."""
    full = load_examples(
        DataSource(path=OAI_REF, label_field="toxicity", require_label=True, drop_duplicates=False),
        origin="eval",
    )
    assert len(full.examples) == 1680 and sum(e.label for e in full.examples) == 522
    deduplicated = load_examples(DataSource(path=OAI_REF, label_field="toxicity", require_label=True))
    assert len(deduplicated.examples) == 1670 and deduplicated.skipped == {"duplicate": 10}
