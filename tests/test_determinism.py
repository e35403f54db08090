"""Two CPU runs with the same seeds give identical synthetic rows and metrics, in separate processes.

Separate processes with different ``PYTHONHASHSEED`` catch what one process cannot: anything that
depends on set/dict iteration order of strings, on time, or on state left over from an earlier run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_training_resume import training_pack

ROOT = Path(__file__).resolve().parents[1]

_AUGMENT = """
import json, sys
from pathlib import Path
from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.augment.pipeline import AugmentationPipeline
from harmaug_pl.augment.responder import Responder
from harmaug_pl.backends.base import SamplingConfig
from harmaug_pl.backends.transformers_backend import TransformersBackend
from tests.test_augment import SEED, FakeTeacher
model, cache = sys.argv[1], Path(sys.argv[2])
backend = TransformersBackend(model)
synthetic = {}
for seed in sys.argv[3:]:
    generator = InstructionGenerator(backend, num_instructions=4, batch_size=2, min_words=1, seed=int(seed),
                                     sampling=SamplingConfig(max_new_tokens=8))
    responder = Responder(backend, sampling=SamplingConfig(max_new_tokens=6), batch_size=4, seed=int(seed))
    result = AugmentationPipeline(generator, responder, FakeTeacher()).run(SEED, cache / seed)
    synthetic[seed] = [row.to_dict() for row in result.rows if row.source == "synthetic"]
print(json.dumps(synthetic))
"""


def run(args: list[str], hash_seed: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_generate_the_same_synthetic_rows(tiny_llama: Path, tmp_path: Path) -> None:
    first = json.loads(run(["-c", _AUGMENT, str(tiny_llama), str(tmp_path / "a"), "7"], "1").stdout)
    second = json.loads(run(["-c", _AUGMENT, str(tiny_llama), str(tmp_path / "b"), "7", "8"], "2").stdout)
    assert first["7"] and first["7"] == second["7"]  # fresh caches, different hash seeds, same rows
    assert second["8"] != first["7"]  # the seed is what decides: another seed samples other rows
    assert all(row["provenance"]["instruction"]["seed"] is not None for row in first["7"])  # logged per row
    cache_file = Path("7") / "generate" / "rank0.jsonl"
    assert (tmp_path / "a" / cache_file).read_bytes() == (tmp_path / "b" / cache_file).read_bytes()


@pytest.mark.slow
def test_two_fits_give_the_same_metrics_and_weights_and_log_the_seed(
    tiny_student: Path, tmp_path: Path
) -> None:
    runs = []
    for name, hash_seed in [("first", "1"), ("second", "2")]:
        workdir = tmp_path / name
        workdir.mkdir()
        pack = training_pack(workdir, tiny_student, "run")
        csv = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(workdir / "csv")},
        }
        logger = workdir / "csv_logger.yaml"
        logger.write_text(yaml.safe_dump({"trainer": {"logger": csv}}))
        proc = run(["-m", "harmaug_pl", "fit", "--config", str(pack), "--config", str(logger)], hash_seed)
        assert "Seed set to 1234" in proc.stdout + proc.stderr
        runs.append(workdir)
    first, second = (load_file(w / "run" / "student" / "model.safetensors") for w in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    metrics = [(w / "csv" / "lightning_logs" / "version_0" / "metrics.csv").read_text() for w in runs]
    assert "val/auprc" in metrics[0] and metrics[0] == metrics[1]  # every logged value, every step
