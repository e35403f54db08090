"""Load seed and evaluation rows into :class:`GuardExample` with strict, located validation.

A :class:`DataSource` (one pack setting) names a local file (``.json``, ``.jsonl``, ``.csv``,
``.parquet``, or ``pkg://<package>/<path>`` inside an installed package) or a Hugging Face dataset,
and maps its columns onto prompt / response / label. :func:`load_examples` reads it and checks every
row. A bad row stops the load with a :class:`DataError` naming the file, the line or row and the
field, or, with ``on_bad_row: skip``, is dropped, counted per reason and summarised in one warning.

Text rules (so that nothing is silently rewritten): prompts and responses are kept exactly as stored;
``str.strip()`` is only used to decide emptiness. An empty or whitespace-only prompt is an error; an
empty or whitespace-only response means "no response" (``None``, a prompt-only row).

Row numbers: JSONL and CSV rows are located by their 1-based line in the file (the CSV header is
line 1); JSON lists, parquet files and HF datasets by their 0-based row index.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, DataError, DataUnavailable, first_line
from harmaug_pl.package_refs import is_package_ref, resolve_package_path

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
BUILTIN_LABELS: dict[str, int] = {
    **dict.fromkeys(["0", "0.0", "false", "no", "safe", "unharmful", "benign", "non-toxic"], 0),
    **dict.fromkeys(["1", "1.0", "true", "yes", "unsafe", "harmful", "toxic"], 1),
}
_MAX_REPORTED_LOCATIONS = 5
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


@dataclass
class CategoryLabels:
    """Human category labels for a source's rows, read from a JSONL file (``.jsonl.gz`` too) and
    joined on the prompt text: ``fields`` maps an OpenAI moderation category name to the file's
    column (0/1; a column absent from a line means *unknown* for that row, never 0)."""

    path: str
    fields: dict[str, str]
    prompt_field: str = "prompt"


@dataclass
class DataSource:
    """Where labelled (or unlabelled) guard rows come from and how their columns map.

    Set exactly one of ``path`` (a local file or ``pkg://<package>/<path>``) and ``hf_name`` (a
    Hugging Face dataset, loaded with ``datasets.load_dataset``; ``hf_name: json`` plus
    ``data_files`` reads local files through ``datasets``). ``records_key`` names the list inside a
    ``.json`` file whose top level is an object. ``hash_range: [lo, hi]`` keeps the rows whose
    prompt hash (:func:`prompt_hash_fraction`) falls in ``[lo, hi)``, so one file can be split into
    disjoint seed and held-out parts. Order of filters: validation, ``drop_duplicates``,
    ``hash_range``, ``limit``. ``preset: <name>`` fills every setting left at its default from a
    shipped eval set (:mod:`harmaug_pl.data.presets`); ``path`` given with a hub preset reads
    that local copy instead of the hub. A setting given with its default value counts as left at
    its default (a dataclass cannot tell them apart), so the preset's value wins there.
    """

    path: str | None = None
    format: str | None = None
    records_key: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    revision: str | None = None
    prompt_field: str = "prompt"
    response_field: str | None = None
    label_field: str | None = "label"
    label_map: dict[str, int] = field(default_factory=dict)
    require_label: bool = False
    max_chars: int = 20000
    on_bad_row: Literal["error", "skip"] = "error"
    drop_duplicates: bool = True
    limit: int | None = None
    hash_range: tuple[float, float] | None = None
    name: str | None = None
    preset: str | None = None
    category_labels: CategoryLabels | None = None

    def __post_init__(self) -> None:
        """Reject inconsistent settings when the pack is parsed, before any data is read."""
        if self.preset is not None:
            self._apply_preset(self.preset)
        if isinstance(self.category_labels, dict):  # from a preset's YAML
            self.category_labels = CategoryLabels(**self.category_labels)
        if (self.path is None) == (self.hf_name is None):
            raise ConfigError(
                "DataSource: set exactly one of 'path' (a local file or pkg://...) and 'hf_name' "
                f"(a Hugging Face dataset); got path={self.path!r}, hf_name={self.hf_name!r}"
            )
        if self.path is not None:
            hf_only = {"hf_config": self.hf_config, "data_files": self.data_files, "revision": self.revision}
            given = [key for key, value in hf_only.items() if value is not None]
            if given:
                raise ConfigError(
                    f"{self.display}: {', '.join(given)} only apply with hf_name, not with path"
                )
            self.file_format()
        if self.require_label and self.label_field is None:
            raise ConfigError(f"{self.display}: require_label is true but label_field is null")
        bad_map = {key: value for key, value in self.label_map.items() if value not in (0, 1)}
        if bad_map:
            raise ConfigError(f"{self.display}: label_map values must be 0 or 1, got {bad_map}")
        if self.max_chars < 1:
            raise ConfigError(f"{self.display}: max_chars must be positive, got {self.max_chars}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"{self.display}: limit must be >= 0, got {self.limit}")
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(
                f"{self.display}: on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}"
            )
        if self.hash_range is not None:
            self.hash_range = tuple(self.hash_range)  # type: ignore[assignment]
            if len(self.hash_range) != 2 or not 0.0 <= self.hash_range[0] < self.hash_range[1] <= 1.0:
                raise ConfigError(
                    f"{self.display}: hash_range must be [lo, hi] with 0 <= lo < hi <= 1, "
                    f"got {self.hash_range}"
                )

    def _apply_preset(self, name: str) -> None:
        """Settings still at their default take the preset's; a location given here wins over its own."""
        from harmaug_pl.data.presets import load_preset

        preset = load_preset(name)
        skip = set()
        if self.path is not None:
            skip = {"hf_name", "hf_config", "split", "data_files", "revision"}
        elif self.hf_name is not None:
            skip = {"path", "format", "records_key"}
        defaults = {
            f.name: f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            for f in dataclass_fields(self)
        }
        for key, value in preset.source.items():
            if key not in defaults:
                raise ConfigError(f"eval-set preset {name!r}: unknown DataSource setting {key!r}")
            if key not in skip and getattr(self, key) == defaults[key]:
                setattr(self, key, value)
        if self.name is None:
            self.name = name
        if self.path is None and self.hf_name is None:
            raise ConfigError(
                f"preset {name!r} ({preset.description}) has no public hub copy: set path: to a local "
                "json/jsonl/csv/parquet file (see the README's evaluation section)"
            )

    @property
    def display(self) -> str:
        """How messages name this source: the display name and the file or dataset."""
        if self.path is not None:
            target = self.path
        else:
            target = f"dataset {self.hf_name!r}"
            if self.hf_config is not None:
                target += f" config {self.hf_config!r}"
            target += f" split {self.split!r}"
            if self.data_files:
                target += f" data_files {self.data_files}"
        return f"{self.name} ({target})" if self.name else target

    def fields(self) -> dict[str, str]:
        """The configured column names, keyed by setting (response/label only when set)."""
        named = {
            "prompt_field": self.prompt_field,
            "response_field": self.response_field,
            "label_field": self.label_field,
        }
        return {setting: column for setting, column in named.items() if column is not None}

    def file_format(self) -> str:
        """The local file's format: ``format`` when set, otherwise from the file suffix."""
        fmt = self.format or FORMATS.get(Path(self.path or "").suffix.lower())
        if fmt not in FORMATS.values():
            raise ConfigError(
                f"{self.display}: cannot tell the file format (format={self.format!r}); "
                f"set format: to one of {sorted(set(FORMATS.values()))}"
            )
        return fmt


@dataclass
class LoadResult:
    """Validated examples plus how many rows were dropped, per reason (bad rows and duplicates)."""

    examples: list[GuardExample]
    skipped: dict[str, int]


def prompt_hash_fraction(prompt: str) -> float:
    """A stable number in [0, 1) for a prompt: sha256 of its stripped UTF-8 text.

    Stripping means prompts differing only in surrounding whitespace land in the same part of a
    hash split, so they cannot leak between seed and held-out sets.
    """
    digest = hashlib.sha256(prompt.strip().encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _BadRow(Exception):
    """One row failed a check: ``reason`` is the counter key, ``field`` the offending field."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field


@dataclass
class _Rows:
    """What a reader found: ``rows`` yields (row number, row object or a _BadRow)."""

    unit: Literal["line", "row"]
    rows: Iterable[tuple[int, Any]]
    columns: list[str] | None = None  # known up front for tabular formats; None when rows vary


def load_examples(source: DataSource, *, origin: Literal["seed", "eval"] = "seed") -> LoadResult:
    """Read ``source`` into validated :class:`GuardExample` rows tagged with ``origin``.

    Raises :class:`DataError` for an unreadable file or dataset, a missing column, a source that
    yields no usable rows, or (with ``on_bad_row: error``) the first bad row.
    """
    table = _open(source)
    if table.columns is not None:
        _check_columns(source, table.columns)
    provenance_key, provenance_value = ("file", source.path) if source.path else ("dataset", source.hf_name)

    examples: list[GuardExample] = []
    skipped: Counter[str] = Counter()
    reported: list[str] = []
    first_seen: dict[tuple[str, str | None], int] = {}
    keys_seen: set[str] = set()
    n_rows = 0

    def drop(reason: str, note: str) -> None:
        skipped[reason] += 1
        if len(reported) < _MAX_REPORTED_LOCATIONS:
            reported.append(note)

    for number, raw in table.rows:
        n_rows += 1
        location = f"{table.unit} {number}"
        if isinstance(raw, dict):
            keys_seen.update(raw)
        try:
            if isinstance(raw, _BadRow):
                raise raw
            prompt, response, label = _convert(source, raw)
        except _BadRow as bad:
            where = f"{location}, field {bad.field!r}" if bad.field else location
            if source.on_bad_row == "error":
                raise DataError(f"{source.display}, {where}: {bad.detail}") from None
            drop(bad.reason, f"{where} ({bad.reason})")
            continue
        if source.drop_duplicates:
            first = first_seen.setdefault((prompt, response), number)
            if first != number:
                drop("duplicate", f"{location} (duplicate of {table.unit} {first})")
                continue
        examples.append(
            GuardExample(
                prompt=prompt,
                response=response,
                label=label,
                source=origin,
                provenance={provenance_key: provenance_value, "row": number},
            )
        )

    if table.columns is None and keys_seen:
        _check_columns(source, sorted(keys_seen))
    summary = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
    if not examples:
        if n_rows == 0:
            raise DataError(f"{source.display}: contains no rows")
        raise DataError(
            f"{source.display}: none of its {n_rows} rows is usable ({summary}); first: {'; '.join(reported)}"
        )
    if skipped:
        logger.warning(
            "%s: dropped %d of %d rows (%s); first: %s",
            source.display,
            sum(skipped.values()),
            n_rows,
            summary,
            "; ".join(reported),
        )
    if source.hash_range is not None:
        lo, hi = source.hash_range
        examples = [ex for ex in examples if lo <= prompt_hash_fraction(ex.prompt) < hi]
        if not examples:
            raise DataError(
                f"{source.display}: none of its {n_rows} rows falls in hash_range {list(source.hash_range)}; "
                "widen the range or use a larger file"
            )
    if source.limit is not None:
        examples = examples[: source.limit]
    if source.category_labels is not None:
        examples = _join_category_labels(source, examples)
    if origin == "eval":
        _warn_single_class(source, examples)
    return LoadResult(examples=examples, skipped=dict(skipped))


def _join_category_labels(source: DataSource, examples: list[GuardExample]) -> list[GuardExample]:
    """Each row with the human category labels its prompt has in ``source.category_labels``."""
    from harmaug_pl.categories import read_category_labels

    spec = source.category_labels
    assert spec is not None
    path = resolve_package_path(spec.path) if is_package_ref(spec.path) else Path(spec.path).expanduser()
    if not path.is_file():
        raise DataUnavailable(f"{source.display}: category_labels.path {spec.path}: file not found")
    labels = read_category_labels(path, spec.path, spec.fields, spec.prompt_field)
    joined = [replace(ex, category_labels=labels.get(ex.prompt) or None) for ex in examples]
    if not any(ex.category_labels for ex in joined):  # e.g. a preset's labels on another copy of a set
        logger.warning(
            "%s: no prompt of it is in category_labels.path %s, so its rows have no category labels",
            source.display,
            spec.path,
        )
    return joined


def _warn_single_class(source: DataSource, examples: list[GuardExample]) -> None:
    """Warn once, naming the set, when its labelled rows are all one class: it still measures recall
    or false positives, but AUPRC is then 0 or 1 whatever the scores, which reads like a result."""
    labels = Counter(ex.label for ex in examples if ex.label is not None)
    if len(labels) == 1:
        label, count = next(iter(labels.items()))
        logger.warning(
            "%s: all %d labelled rows have label %d (%s): AUPRC is undefined on this set and its reported "
            "value means nothing; read recall/F1 instead, or add rows of the other class",
            source.display,
            count,
            label,
            "unsafe" if label else "safe",
        )


def _convert(source: DataSource, row: Any) -> tuple[str, str | None, int | None]:
    """Check one row object and return (prompt, response, label), or raise _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow("not_an_object", f"expected an object with named fields, got {type(row).__name__}")
    if source.prompt_field not in row:
        raise _BadRow(
            "missing_field",
            f"field missing (fields present: {sorted(row)}); set prompt_field: to the prompt's field",
            source.prompt_field,
        )
    prompt = _text(source, row[source.prompt_field], source.prompt_field)
    if prompt is None:
        raise _BadRow("empty_prompt", "prompt is empty or null", source.prompt_field)
    response = None
    if source.response_field is not None:
        response = _text(source, row.get(source.response_field), source.response_field)
    label = None
    if source.label_field is not None:
        label = _label(source, row.get(source.label_field))
        if label is None and source.require_label:
            raise _BadRow(
                "missing_label", "label is missing or null and require_label is true", source.label_field
            )
    return prompt, response, label


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(source: DataSource, value: Any, name: str) -> str | None:
    """Validate a prompt/response value; ``None`` when it is null, empty or whitespace-only."""
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        raise _BadRow("not_a_string", f"expected a string, got {type(value).__name__} {value!r:.80}", name)
    escaped = _ESCAPED_BYTE.search(value)
    if escaped:
        raise _BadRow(
            "not_utf8",
            f"not valid UTF-8: byte 0x{ord(escaped.group()) - 0xDC00:02x} at character {escaped.start()}",
            name,
        )
    if not value.strip():
        return None
    if len(value) > source.max_chars:
        raise _BadRow("too_long", f"{len(value)} characters, more than max_chars={source.max_chars}", name)
    return value


def _label(source: DataSource, value: Any) -> int | None:
    """Map a stored label to 0/1 (``label_map`` first, then :data:`BUILTIN_LABELS`); None if missing."""
    if _is_missing(value):
        return None
    key = str(value).strip().lower()
    if not key:
        return None
    custom = {str(k).strip().lower(): v for k, v in source.label_map.items()}
    if key in custom:
        return custom[key]
    if key in BUILTIN_LABELS:
        return BUILTIN_LABELS[key]
    accepted = sorted(set(BUILTIN_LABELS) | set(custom))
    raise _BadRow(
        "bad_label",
        f"cannot read {value!r:.80} as a label; accepted (case-insensitive): {', '.join(accepted)}, "
        f"ints 0/1 and booleans. Add a mapping with label_map: {{{key!r}: 0 or 1}}",
        source.label_field,
    )


def _check_columns(source: DataSource, columns: list[str]) -> None:
    """Fail once, up front, when a configured field is not among the data's columns."""
    missing = [f"{setting}={name!r}" for setting, name in source.fields().items() if name not in columns]
    if missing:
        raise DataError(
            f"{source.display}: column(s) not found: {', '.join(missing)}; columns present: {columns}. "
            "Point prompt_field/response_field/label_field at existing columns "
            "(response_field: null / label_field: null when the data has none)"
        )


def _open(source: DataSource) -> _Rows:
    """Dispatch to the reader for the source's format; file-level problems raise DataError here."""
    if source.hf_name is not None:
        return _read_hf(source)
    path = _local_path(source)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{source.display}: cannot read {path}: {err}") from err
    readers = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    return readers[source.file_format()](source, path, data)


def _local_path(source: DataSource) -> Path:
    assert source.path is not None
    if is_package_ref(source.path):
        path = resolve_package_path(source.path)
    else:
        path = Path(source.path).expanduser()
    if not path.is_file():
        if path.is_dir():
            raise DataError(f"{source.display}: is a directory, not a file (looked at {path.resolve()})")
        raise DataUnavailable(f"{source.display}: file not found (looked at {path.resolve()})")
    return path


def _read_jsonl(source: DataSource, path: Path, data: bytes) -> _Rows:
    def rows() -> Iterator[tuple[int, Any]]:
        offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        for number, line in enumerate(data[offset:].split(b"\n"), start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    number,
                    _BadRow(
                        "not_utf8",
                        f"not valid UTF-8: byte 0x{line[err.start]:02x} at byte offset {start + err.start} "
                        f"(column {err.start + 1})",
                    ),
                )
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, _BadRow("malformed_json", f"malformed JSON at column {err.colno}: {err.msg}")
            except RecursionError:
                yield number, _BadRow("malformed_json", "malformed JSON: nested too deeply to be a row")

    return _Rows(unit="line", rows=rows())


def _read_json(source: DataSource, path: Path, data: bytes) -> _Rows:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{source.display}, line {line}: not valid UTF-8: "
            f"byte 0x{data[err.start]:02x} at byte offset {err.start}"
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{source.display}, line {err.lineno}, column {err.colno}: malformed JSON: {err.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{source.display}: malformed JSON: nested too deeply to be a list of rows") from None
    if isinstance(document, dict):
        lists = sorted(key for key, value in document.items() if isinstance(value, list))
        if source.records_key is None or source.records_key not in document:
            raise DataError(
                f"{source.display}: the top level is an object, so set records_key: to the key holding "
                f"the list of rows (records_key={source.records_key!r}; keys with lists: {lists})"
            )
        document = document[source.records_key]
    if not isinstance(document, list):
        raise DataError(f"{source.display}: expected a JSON list of objects, got {type(document).__name__}")
    return _Rows(unit="row", rows=enumerate(document))


def _read_csv(source: DataSource, path: Path, data: bytes) -> _Rows:
    # surrogateescape keeps undecodable bytes so the row and field holding them can be named later.
    text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def records() -> Iterator[tuple[int, list[str]]]:
        records_iter = iter(reader)
        while True:
            start = reader.line_num + 1
            try:
                record = next(records_iter)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{source.display}, line {reader.line_num}: CSV parse error: {err}") from None
            if record:  # blank lines carry no row
                yield start, record

    numbered = records()
    header_line = next(numbered, None)
    if header_line is None:
        raise DataError(f"{source.display}: empty CSV file (no header row)")
    header = header_line[1]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(
            f"{source.display}, line {header_line[0]}: the header names the column(s) {repeated} more than "
            "once, so which one holds the data is ambiguous; rename them"
        )

    def rows() -> Iterator[tuple[int, Any]]:
        for number, record in numbered:
            if len(record) != len(header):
                yield (
                    number,
                    _BadRow("csv_field_count", f"has {len(record)} fields but the header has {len(header)}"),
                )
            else:
                yield number, dict(zip(header, record))

    return _Rows(unit="line", rows=rows(), columns=header)


def _read_parquet(source: DataSource, path: Path, data: bytes) -> _Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        columns = parquet.schema_arrow.names
        _check_columns(source, columns)
        records = parquet.read(columns=list(source.fields().values())).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{source.display}: not a readable parquet file: {err}") from None
    return _Rows(unit="row", rows=enumerate(records), columns=columns)


def _read_hf(source: DataSource) -> _Rows:
    import datasets

    data_files = (
        [str(resolve_package_path(f)) if is_package_ref(f) else f for f in source.data_files]
        if source.data_files
        else None
    )
    try:
        dataset = datasets.load_dataset(
            source.hf_name,
            source.hf_config,
            split=source.split,
            data_files=data_files,
            revision=source.revision,
        )
    except Exception as err:
        raise DataUnavailable(
            f"{source.display}: could not load the dataset ({type(err).__name__}: {first_line(err)}). "
            "The Hugging Face hub may be unreachable (offline mode, no network) or the dataset, config "
            "or split does not exist. Download it and set path: to a local json/jsonl/csv/parquet copy."
        ) from err
    columns = list(dataset.column_names)
    _check_columns(source, columns)
    selected = dataset.select_columns(list(source.fields().values()))
    return _Rows(unit="row", rows=enumerate(selected), columns=columns)
