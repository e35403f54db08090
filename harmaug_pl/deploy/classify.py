"""``harmaug classify``: score a prompt, a prompt + response, or a JSONL/JSON/CSV file with a guard.

The guard is any export :class:`~harmaug_pl.deploy.guard.Guard` loads (a folder, or an ``.onnx`` file in
one). Files are read and validated by :func:`harmaug_pl.data.loaders.load_examples`, so a bad line
stops the run with the file, line and field named. Rows longer than the student's ``max_length`` are
truncated exactly as in training; the output marks them (``truncated``) and the summary counts them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.errors import ConfigError, one_line_errors


def classify_rows(
    guard: Guard,
    prompts: list[str],
    responses: list[str | None],
    threshold: float,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One output record per row: P(unsafe), the label at ``threshold``, whether it was truncated."""
    records: list[dict[str, Any]] = []
    with tqdm(total=len(prompts), desc="classify", unit="row", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk_p = prompts[start : start + batch_size]
            chunk_r = responses[start : start + batch_size]
            verdicts = guard.classify(chunk_p, chunk_r, threshold, batch_size=batch_size)
            for prompt, response, verdict in zip(chunk_p, chunk_r, verdicts, strict=True):
                records.append({"prompt": prompt, "response": response, **verdict})
            bar.update(len(chunk_p))
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmaug classify",
        description=(
            "Score prompts (or prompt + response pairs) with an exported guard: P(unsafe) and the label "
            "at a threshold, and P(category) per harm category for guards trained with categories "
            "(* marks those above their threshold). Give --prompt [--response], or --input FILE "
            "(.jsonl, .json, .csv)."
        ),
    )
    parser.add_argument("--model", required=True, help="an exported folder, or an .onnx file inside one")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt to score")
    what.add_argument("--input", help="a .jsonl, .json or .csv file of rows to score")
    parser.add_argument("--response", help="with --prompt: score the (prompt, response) pair")
    parser.add_argument("--prompt_field", default="prompt", help="with --input")
    parser.add_argument("--response_field", default=None, help="with --input; rows without one: prompt only")
    parser.add_argument("--output", help="JSONL file for the scored rows (default: print them)")
    parser.add_argument("--threshold", type=float, default=None, help="default: the export's threshold")
    parser.add_argument("--batch_size", type=int, default=32)
    return parser


def main(argv: list[str]) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.response is not None and args.prompt is None:
        raise ConfigError("--response needs --prompt (with --input, name the field with --response_field)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    guard = Guard.from_pretrained(args.model)
    threshold = guard.threshold if args.threshold is None else args.threshold
    if args.prompt is not None:
        prompts, responses = [args.prompt], [args.response]
    else:
        if not Path(args.input).is_file():
            raise ConfigError(f"--input {args.input}: no such file")
        source = DataSource(
            path=args.input,
            prompt_field=args.prompt_field,
            response_field=args.response_field,
            label_field=None,
            drop_duplicates=False,
        )
        rows = load_examples(source).examples
        prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    records = classify_rows(guard, prompts, responses, threshold, args.batch_size, progress=len(prompts) > 1)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
    elif args.prompt is None:
        sys.stdout.write(lines)
    if args.prompt is not None:
        record = records[0]
        what = "prompt + response" if args.response else "prompt"
        print(f"{record['label']}  P(unsafe)={record['p_unsafe']:.4f}  ({what}, threshold {threshold})")
        for name, score in record.get("category_scores", {}).items():
            mark = "*" if name in record["categories"] else " "
            print(f" {mark} {name:<24} P={score:.4f}  (threshold {guard.category_thresholds[name]:.4f})")
    n_cut = sum(r["truncated"] for r in records)
    if n_cut:
        print(
            f"note: {n_cut} of {len(records)} rows are longer than {guard.settings.max_length} tokens and "
            "were truncated as in training (scored on their first tokens only)",
            file=sys.stderr,
        )
    if args.output:
        unsafe = sum(r["label"] == "unsafe" for r in records)
        print(
            f"{len(records)} rows, {unsafe} unsafe at threshold {threshold} -> {args.output}", file=sys.stderr
        )
    return records


def console_main(argv: list[str]) -> None:
    """``harmaug classify ...``: our errors as one line and exit status 2, like the Trainer commands."""
    with one_line_errors("harmaug classify"):
        main(argv)
