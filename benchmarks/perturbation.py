"""Evasion by rewriting the text: AUPRC on the held-out rows under each perturbation, without and
with the text normaliser (:mod:`harmaug_pl.data.normalise`), side by side in one run.

Rows: the pack's first eval set (``cpu_tiny``: the 70% of the OpenAI moderation prompts that are not
seed data, human labels). Each perturbation rewrites every prompt the same deterministic way (those
that pick characters use ``--seed``). Arms: the guard folder as saved (``as exported``), and the same
weights with the normaliser installed in its tokenizer in memory (``normalised``): what a folder
exported with ``data.normalise_text: true`` applies. The weights are the same in both arms, so the
difference is the tokenisation alone; a student trained with the normaliser may gain more.

    python -m benchmarks.perturbation --model runs/cpu_tiny/student [--rows 0] [--pack cpu_tiny]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    machine_info,
    markdown_table,
    pack_config,
    write_results,
)
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.data.normalise import has_normaliser, install_normaliser
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.evaluation.metrics import auprc
from harmaug_pl.evaluation.perturbation import PERTURBATIONS, ScoresByTokens, perturb
from harmaug_pl.model_loading import load_tokenizer

NAME = "perturbation"


def held_out_rows(pack: str, rows: int) -> tuple[str, list[str], np.ndarray]:
    """The pack's first eval set: its name, prompts and human labels (the first ``rows``; 0: all)."""
    data = pack_config(pack)["data"]["init_args"]
    name, source = next(iter(data["eval_sets"].items()))
    examples = load_examples(DataSource(**source), origin="eval").examples
    examples = [e for e in examples if e.label is not None][: rows or None]
    return name, [e.prompt for e in examples], np.array([e.label for e in examples], dtype=np.int64)


def arms(folder: Path) -> dict[str, Guard]:
    """The folder as saved, and the same guard with the normaliser in its tokenizer."""
    saved = Guard.from_pretrained(folder)
    if has_normaliser(saved.tokenizer):
        return {"as exported (normalises already)": saved}
    normalised = Guard(
        install_normaliser(load_tokenizer(str(folder))), saved.runner, saved.settings, "normalised"
    )
    return {"as exported": saved, "normalised": normalised}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/cpu_tiny/student", help="an exported guard folder")
    parser.add_argument("--pack", default=DEFAULT_PACK, help="pack whose first eval set is scored")
    parser.add_argument("--rows", type=int, default=0, help="first N held-out rows (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the perturbations that draw")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    eval_set, prompts, labels = held_out_rows(args.pack, args.rows)
    guards = {
        arm: ScoresByTokens(
            guard.tokenizer,
            guard.settings.max_length,
            lambda texts, _responses, guard=guard: guard.score(texts, batch_size=args.batch_size),
        )
        for arm, guard in arms(Path(args.model)).items()
    }
    results: dict[str, dict[str, float | None]] = {}
    started = time.perf_counter()
    no_responses = [None] * len(prompts)
    rewrites = {"clean": list(prompts)}
    rewrites.update({p.label: perturb(name, prompts, args.seed) for name, p in PERTURBATIONS.items()})
    for label, texts in rewrites.items():
        results[label] = {arm: auprc(labels, scores(texts, no_responses)) for arm, scores in guards.items()}
        print(f"{label}: {results[label]}", flush=True)
    arm_names = list(guards)
    headers = ["perturbation", *(f"AUPRC {arm}" for arm in arm_names)]
    if len(arm_names) == 2:
        headers.append("normalised - as exported")
    clean = results["clean"]
    rows = []
    for name, by_arm in results.items():
        row: list[Any] = [name, *(by_arm[arm] for arm in arm_names)]
        if len(arm_names) == 2:
            row.append(by_arm[arm_names[1]] - by_arm[arm_names[0]])
        rows.append(row)
    drop = {name: {arm: by_arm[arm] - clean[arm] for arm in arm_names} for name, by_arm in results.items()}
    markdown = (
        f"# Perturbation eval\n\nGuard {args.model}; {len(prompts)} rows of `{eval_set}` "
        f"({int(labels.sum())} unsafe, human labels), prompts only; seed {args.seed}; "
        f"{time.perf_counter() - started:.0f} s.\n\n" + markdown_table(headers, rows)
    )
    data = {
        "model": args.model,
        "eval_set": eval_set,
        "rows": len(prompts),
        "unsafe": int(labels.sum()),
        "seed": args.seed,
        "auprc": results,
        "change_from_clean": drop,
        "machine": machine_info(),
    }
    write_results(NAME, data, markdown, args.out_dir)
    return data


if __name__ == "__main__":
    main()
