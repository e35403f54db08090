"""Instruction diversity: known clusters and cosines on hand-built vectors, snapshot reading, embedding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import DataError
from harmaug_pl.evaluation import diversity
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl


def test_three_tight_groups_and_one_outlier() -> None:
    a, b, c = torch.eye(3)
    outlier = torch.ones(3) / math.sqrt(3)  # cosine 0.577 to every group: farther than eps=0.3
    vectors = torch.stack([a, a, a, b, b, b, c, c, c, outlier])
    result = diversity.diversity(vectors, eps=0.3, min_samples=3)
    assert result["clusters"] == 3 and result["noise"] == 1 and result["instructions"] == 10
    # 45 pairs: 9 within a group (cosine 1), 27 across groups (0), 9 with the outlier (1/sqrt(3))
    assert result["mean_pairwise_cosine"] == pytest.approx((9 + 9 / math.sqrt(3)) / 45, abs=1e-4)
    # the count does not depend on row order, nor on the vectors' lengths
    shuffled = (vectors * torch.arange(1, 11).unsqueeze(1))[
        torch.randperm(10, generator=torch.Generator().manual_seed(0))
    ]
    assert diversity.diversity(shuffled, eps=0.3, min_samples=3)["clusters"] == 3
    # a looser eps joins everything through the outlier
    assert diversity.diversity(vectors, eps=0.5, min_samples=3)["clusters"] == 1
    assert diversity.diversity(vectors[:1])["clusters"] is None  # one instruction: nothing to compare


def test_groups_from_a_snapshot(tmp_path: Path) -> None:
    rows = [GuardExample(p, label=1, teacher_score=0.9) for p in PLACEHOLDER_UNSAFE]
    rows += [GuardExample(p, label=0, teacher_score=0.8) for p in PLACEHOLDER_SAFE]  # humans decide
    rows += [GuardExample("an unlabelled placeholder", teacher_score=0.7)]  # the teacher decides
    rows += [GuardExample("synthetic placeholder ask", source="synthetic", teacher_score=0.2)]
    rows += [GuardExample("synthetic placeholder ask", "a refusal", source="synthetic")]  # same instruction
    path = write_jsonl(tmp_path / "augmented.jsonl", [r.to_dict() for r in rows])
    groups = diversity.harmful_instructions(diversity.read_snapshot(path))
    assert groups["seed"] == [*PLACEHOLDER_UNSAFE, "an unlabelled placeholder"]
    assert groups["synthetic"] == ["synthetic placeholder ask"]
    assert groups["seed+synthetic"] == [*groups["seed"], *groups["synthetic"]]


def test_a_bad_snapshot_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "augmented.jsonl"
    path.write_text(json.dumps(GuardExample("ok").to_dict()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"augmented.jsonl, line 2"):
        diversity.read_snapshot(path)
    with pytest.raises(DataError, match="no such file"):
        diversity.read_snapshot(tmp_path / "missing.jsonl")


def test_embeddings_are_unit_mean_pooled_and_ignore_padding(tiny_student: Path) -> None:
    short, long = "rude placeholder", "a much longer placeholder sentence about baking bread in spring"
    together = diversity.embed([short, long], str(tiny_student))
    alone = diversity.embed([short], str(tiny_student))
    assert together.shape[0] == 2
    assert torch.allclose(together.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # padding tokens are left out of the mean


def test_command_line_report(tiny_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [GuardExample(p, label=1) for p in PLACEHOLDER_UNSAFE]
    rows += [GuardExample(f"synthetic placeholder {i}", source="synthetic") for i in range(3)]
    snapshot = write_jsonl(tmp_path / "augmented.jsonl", [r.to_dict() for r in rows])
    out = tmp_path / "diversity.json"
    report = diversity.main([str(snapshot), "--encoder", str(tiny_student), "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["seed"]["instructions"] == 4 and report["synthetic"]["instructions"] == 3
    assert report["seed+synthetic"]["instructions"] == 7
    assert "| synthetic | 3 |" in capsys.readouterr().out
