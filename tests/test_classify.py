"""``harmaug classify``: CLI and API agree; pairs, files, and bad input as one clear line."""

from __future__ import annotations

import csv as csv_module
import json
import sys
from pathlib import Path

import pytest

from harmaug_pl.cli import console_main
from harmaug_pl.deploy.export import INT8_FILE
from harmaug_pl.deploy.guard import Guard
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl


def harmaug(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """Run the ``harmaug`` console script in-process."""
    monkeypatch.setattr(sys, "argv", ["harmaug", *args])
    console_main()


def rows() -> list[dict]:
    long_prompt = " ".join(PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE)
    return [
        {"prompt": PLACEHOLDER_UNSAFE[0], "response": "I'm sorry, but I can't help with that."},
        {"prompt": PLACEHOLDER_SAFE[0]},
        {"prompt": long_prompt, "response": "Sure, here is how to do that."},
    ]


@pytest.mark.parametrize("model", ["", INT8_FILE])
def test_cli_file_output_agrees_with_the_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_export: Path, model: str
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", rows())
    out = tmp_path / "out.jsonl"
    path = str(tiny_export / model) if model else str(tiny_export)
    harmaug(
        monkeypatch,
        "classify",
        "--model",
        path,
        "--input",
        str(data),
        "--response_field",
        "response",
        "--output",
        str(out),
        "--threshold",
        "0.4",
        "--batch_size",
        "2",
    )
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # same batch size as the CLI: int8 activations are quantised per batch, so int8 scores move a
    # little with the batch's composition (padding included)
    expected = Guard.from_pretrained(path).score(
        [r["prompt"] for r in rows()], [r.get("response") for r in rows()], batch_size=2
    )
    assert [g["p_unsafe"] for g in got] == pytest.approx(expected, abs=1e-6)
    assert [g["label"] for g in got] == ["unsafe" if p > 0.4 else "safe" for p in expected]
    assert [g["truncated"] for g in got] == [False, False, True]
    assert got[1]["response"] is None


def test_cli_csv_and_single_pair(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_export: Path, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "in.csv"
    with csv.open("w", newline="") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["text", "reply"])
        writer.writerows([r["prompt"], r.get("response", "")] for r in rows()[:2])
    out = tmp_path / "out.jsonl"
    harmaug(
        monkeypatch,
        "classify",
        "--model",
        str(tiny_export),
        "--input",
        str(csv),
        "--prompt_field",
        "text",
        "--response_field",
        "reply",
        "--output",
        str(out),
    )
    got = [json.loads(line)["p_unsafe"] for line in out.read_text().splitlines()]
    guard = Guard.from_pretrained(tiny_export)
    assert got == pytest.approx(
        guard.score([r["prompt"] for r in rows()[:2]], [r.get("response") for r in rows()[:2]])
    )

    capsys.readouterr()
    first = rows()[0]
    harmaug(
        monkeypatch,
        "classify",
        "--model",
        str(tiny_export),
        "--prompt",
        first["prompt"],
        "--response",
        first["response"],
    )
    printed = capsys.readouterr().out
    assert f"P(unsafe)={guard.score([first['prompt']], [first['response']])[0]:.4f}" in printed
    assert "prompt + response" in printed


def test_bad_input_is_one_line_naming_file_line_and_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_export: Path, capsys: pytest.CaptureFixture
) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "fine"}\n{"prompt": \n')
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "fine"}, {"text": "no prompt field"}])
    cases = [
        (["--input", str(bad_json)], f"{bad_json}, line 2"),
        (["--input", str(missing)], "line 2, field 'prompt'"),
        (["--input", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--prompt", "x", "--threshold", "0.5", "--batch_size", "0"], "--batch_size"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            harmaug(monkeypatch, "classify", "--model", str(tiny_export), *args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("harmaug classify: error:") and expected in err[-1], err


def test_help_lists_the_serving_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        harmaug(monkeypatch, "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "harmaug export --help" in text and "harmaug classify --help" in text
    assert "harmaug serve --help" in text
