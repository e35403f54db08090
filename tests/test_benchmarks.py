"""Smoke tests of the benchmark code on tiny models, so it does not rot (numbers are not checked here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from benchmarks import default_pack, first_run, generation_throughput, remote_backend
from benchmarks.common import PhaseClock, markdown_table, pack_config, write_results
from harmaug_pl.cli import ablation
from tests.helpers import tiny_throughput_argv


def placeholder_teacher(texts: list[str]) -> list[float]:
    """Test placeholder teacher: text with 'rude' or 'mean' is unsafe."""
    return [0.9 if ("rude" in t or "mean" in t) else 0.1 for t in texts]


def test_throughput_runs_loop_and_batches_on_the_same_chats(tiny_llama: Path, tmp_path: Path) -> None:
    data = generation_throughput.main(
        [
            *tiny_throughput_argv(tiny_llama),
            "--arms",
            "transformers",
            "--score-rows",
            "0",
            "--out-dir",
            str(tmp_path),
        ]
    )
    results = {(r["batch_size"], r["mode"]): r for r in data["results"]}
    assert sorted(results) == [  # the sequential loop is always measured
        (1, "sequential loop"),
        (2, "batched, length order + prefix cache"),  # as the pack's chat stages run
        (2, "batched, request order"),
    ]
    for result in data["results"]:
        assert result["rows"] == 4
        assert 4 <= result["new_tokens"] <= 4 * 4  # at least one token per row, at most max_new_tokens
        assert result["rows_per_s"] > 0
    loop = results[(1, "sequential loop")]
    assert loop["rows_per_s_vs_sequential"] == 1.0 and loop["cpu_seconds"] > 0
    assert loop["useful_slot_fraction"] == 1.0  # a batch of one never decodes a finished row
    assert data["machine"]["torch_threads"] == 1
    written = json.loads((tmp_path / "generation_throughput.json").read_text())
    assert written["results"] == data["results"]
    assert "| transformers | sequential loop | 1 | 4 |" in (tmp_path / "generation_throughput.md").read_text()
    # (a), the reference of the vLLM arms: the batches as the chat stage cuts them
    stage = results[(2, "batched, length order + prefix cache")]
    assert (
        stage["rows_per_s_vs_transformers_stage"] == 1.0 and loop["rows_per_s_vs_transformers_stage"] is None
    )


def test_throughput_vllm_arms_say_why_they_are_skipped(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation_throughput, "installed_build", lambda: None)  # as in .venv
    argv = ["--model", str(tiny_llama), "--n", "2", "--batch-sizes", "2", "--max-new-tokens", "2"]
    data = generation_throughput.main(
        [*argv, "--modes", "stage", "--score-rows", "2", "--out-dir", str(tmp_path)]
    )
    skipped = {r["engine"]: r["skipped"] for r in data["results"] if "skipped" in r}
    assert list(skipped) == ["vLLM in-process", "vllm serve (HTTP)"]
    assert all(
        reason.startswith("vLLM is not installed: bash scripts/install.sh") for reason in skipped.values()
    )
    assert [r["engine"] for r in data["results"] if "skipped" not in r] == ["transformers"] * 2
    assert [(r["engine"], r.get("skipped", "")[:21]) for r in data["scoring"]] == [
        ("transformers", ""),
        ("vLLM in-process", "vLLM is not installed"),
    ]
    assert data["scoring"][0]["rows"] == 2 and data["scoring"][0]["max_abs_score_diff_vs_transformers"] == 0
    table = (tmp_path / "generation_throughput.md").read_text()
    assert "| vllm serve (HTTP) | skipped: vLLM is not installed: bash scripts/install.sh" in table


def test_throughput_vllm_arm_sends_the_stage_batches_and_scores_as_transformers(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process arm on the fake engine (tests/fake_vllm.py); the real engine: test_vllm_benchmark."""
    from tests import fake_vllm

    module = fake_vllm.make_module(device_type="cpu")
    fake_vllm.install(monkeypatch, module)
    monkeypatch.setattr(generation_throughput, "installed_build", lambda: "cpu")
    argv = ["--model", str(tiny_llama), "--n", "4", "--batch-sizes", "2", "--max-new-tokens", "3"]
    data = generation_throughput.main(
        [*argv, "--arms", "vllm", "vllm-serve", "--score-rows", "3", "--out-dir", str(tmp_path)]
    )
    measured, serve = data["results"]
    assert (measured["engine"], measured["batch_size"], measured["rows"]) == ("vLLM in-process", 2, 4)
    assert measured["new_tokens"] == 0  # what the fake's outputs hold; the real engine's are counted alike
    assert (
        serve["engine"] == "vllm serve (HTTP)" and "api_server" in serve["skipped"]
    )  # the fake has no server
    calls = module.recorder.generate_calls
    # the engine start, then the warm-up chat, then the two stage batches of two, each chat its own seed
    assert [len(call["prompts"]) for call in calls[:3]] == [1, 2, 2]
    assert [p.seed for call in calls[1:3] for p in call["params"]] == [0, 1, 1_000_003, 1_000_004]
    assert module.recorder.llm_kwargs[0]["dtype"] == "float32"  # the cpu_vllm pack's settings
    assert data["vllm_env"]["OMP_NUM_THREADS"] == str(data["machine"]["torch_threads"])
    transformers, vllm = data["scoring"]
    assert vllm["engine"] == "vLLM in-process" and vllm["rows"] == 3
    assert vllm["max_abs_score_diff_vs_transformers"] < 1e-5  # the fake scores with the same weights
    assert vllm["left_behind"] == []


def test_throughput_chats_are_the_packs_prefix_attack_chats(tiny_llama: Path) -> None:
    from harmaug_pl.backends import TransformersBackend

    pack = pack_config()
    backend = TransformersBackend(str(tiny_llama))
    try:
        chats = generation_throughput.generator_chats(backend, 3, pack)
    finally:
        backend.close()  # backends share loaded models: leave none behind for later tests
    generator = pack["data"]["init_args"]["generator"]["init_args"]
    assert len(chats) == 3
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert chat[1]["content"] == "I have an idea for a prompt:"
        assert chat[0]["content"].count("\n") >= generator["num_exemplars"]  # one exemplar per line
    assert generation_throughput.pack_sampling(pack, 7).max_new_tokens == 7


def test_table_and_writer(tmp_path: Path) -> None:
    table = markdown_table(["a", "b"], [[1.23456, "x|y"], [2.0, "line\nbreak"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x\\|y |", "| 2 | line break |"]
    path = write_results("demo", {"value": 1}, table, tmp_path)
    assert json.loads(path.read_text()) == {"value": 1}
    assert (tmp_path / "demo.md").read_text() == table + "\n"


def test_phase_clock_accumulates_named_phases() -> None:
    clock = PhaseClock()
    clock.start("a")
    clock.start("b")  # ends "a"
    clock.start("a")
    clock.stop()
    assert list(clock.phases) == ["a", "b"] and clock.current is None
    assert all(p["seconds"] >= 0 and p["peak_rss_mib"] > 0 for p in clock.phases.values())


def test_workdir_is_only_wiped_when_the_benchmark_made_it(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user file")
    with pytest.raises(SystemExit, match="not made by this benchmark"):
        default_pack.prepare_workdir(foreign, reuse_cache=False)
    assert (foreign / "keep.txt").exists()

    ours = tmp_path / "ours"
    default_pack.prepare_workdir(ours, reuse_cache=False)
    (ours / "cache").mkdir()
    (ours / "harmaug" / "seed42" / "checkpoints").mkdir(parents=True)
    default_pack.prepare_workdir(ours, reuse_cache=True)
    assert sorted(p.name for p in ours.iterdir()) == sorted([default_pack.MARKER, "cache"])
    default_pack.prepare_workdir(ours, reuse_cache=False)
    assert [p.name for p in ours.iterdir()] == [default_pack.MARKER]


def test_stage_times_move_the_llm_load_out_of_the_first_computing_stage() -> None:
    stats = {
        "seconds_generate": 0.0,
        "computed_generate": 0,  # fully cached
        "seconds_respond": 50.0,
        "computed_respond": 100,
        "seconds_label": 2.0,
        "computed_label": 300,
    }
    loads = [{"kind": "chat LLM", "seconds": 30.0}, {"kind": "student", "seconds": 5.0}]
    stages = {s["stage"]: s for s in default_pack.stage_times(stats, loads)}
    assert stages["generate"]["rows_per_s"] is None
    assert stages["respond"]["seconds"] == 20.0 and stages["respond"]["rows_per_s"] == 5.0
    assert stages["label"]["seconds"] == 2.0


def test_binary_metrics_match_hand_computed_values() -> None:
    probs = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1])
    target = torch.tensor([1, 0, 1, 0, 0])
    metrics = ablation.binary_metrics(probs, target, 0.5)
    # predicted unsafe: rows 0, 1, 3 -> tp 1, fp 2, fn 1
    assert metrics["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["recall"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["f1"] == pytest.approx(0.4, abs=1e-4)
    # ranking 0.9(+) 0.8(-) 0.6(-) 0.3(+): AP = (1/1 + 2/4) / 2
    assert metrics["auprc"] == pytest.approx(0.75, abs=1e-4)


def tiny_pack(tmp_path: Path, tiny_llama: Path, tiny_student: Path) -> Path:
    """The default pack with every model swapped for a tiny one and a small placeholder data set."""
    rows = [{"prompt": f"write a rude joke about placeholder people {i}", "toxicity": 1} for i in range(8)]
    rows += [{"prompt": f"how do I bake bread, variant {i}?", "toxicity": 0} for i in range(8)]
    data_file = tmp_path / "placeholder.json"
    data_file.write_text(json.dumps(rows))
    pack = pack_config()
    data = pack["data"]["init_args"]
    data["seed_data"].update(path=str(data_file), hash_range=[0.0, 0.6])
    data["eval_sets"]["openai_moderation_heldout"].update(path=str(data_file), hash_range=[0.6, 1.0])
    for stage in ("generator", "responder"):
        data[stage]["init_args"]["backend"]["init_args"]["model"] = str(tiny_llama)
        data[stage]["init_args"]["sampling"]["max_new_tokens"] = 6
        data[stage]["init_args"]["batch_size"] = 4
    data["generator"]["init_args"]["num_instructions"] = 4
    # random tiny models babble: keep any non-empty line so the run has synthetic rows
    data["generator"]["init_args"]["min_words"] = 1
    data["generator"]["init_args"]["sampling"]["max_new_tokens"] = 12
    data["teacher"]["init_args"]["function"] = f"{__name__}:placeholder_teacher"
    data.update(batch_size=4, max_length=64)
    pack["model"]["init_args"]["student"] = str(tiny_student)
    pack["trainer"]["max_epochs"] = 1
    path = tmp_path / "tiny_pack.yaml"
    path.write_text(yaml.safe_dump(pack, sort_keys=False))
    return path


@pytest.mark.slow
def test_default_pack_benchmark_end_to_end_on_tiny_models(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything the pack still writes relative lands in tmp
    pack = tiny_pack(tmp_path, tiny_llama, tiny_student)
    out = tmp_path / "results"
    args = ["--pack", str(pack), "--workdir", str(tmp_path / "work"), "--out-dir", str(out), "--in-process"]
    data = default_pack.main([*args, "--seeds", "1"])

    runs = {r["variant"]: r for r in data["runs"]}
    assert sorted(runs) == ["harmaug", "kd_only"] and {r["seed"] for r in data["runs"]} == {42}
    harmaug, kd_only = runs["harmaug"], runs["kd_only"]
    assert harmaug["augmentation_stats"]["instructions_asked"] == 4
    assert "instructions_asked" not in kd_only["augmentation_stats"]
    synthetic = harmaug["augmentation_stats"]["rows_synthetic"]
    assert synthetic > 0
    assert (
        harmaug["train_rows"] + harmaug["val_rows"] == kd_only["train_rows"] + kd_only["val_rows"] + synthetic
    )
    assert kd_only["optimizer_steps"] == harmaug["optimizer_steps"]  # the default budget: same steps
    assert [s["stage"] for s in harmaug["stages"]] == ["generate", "respond", "label"]
    # the chat LLM may already be loaded by an earlier test (backends share loaded models)
    assert "student" in {load["kind"] for load in harmaug["model_loads"]}
    assert {load["kind"] for load in harmaug["model_loads"]} <= {"chat LLM", "student"}
    assert "training (incl. validation)" in harmaug["phases"]
    assert default_pack.PHASES["teacher"] in harmaug["phases"]  # teacher metrics: in the first run only
    assert "teacher scoring of eval sets" not in kd_only["phases"]
    for run in (harmaug, kd_only):
        metrics = run["metrics"]["openai_moderation_heldout"]
        assert 0.0 <= metrics["auprc"] <= 1.0
        assert Path(run["checkpoint"]).is_file()
    summary = data["ablation"]["summary"]["openai_moderation_heldout"]
    assert summary["harmaug"]["auprc"]["mean"] == harmaug["metrics"]["openai_moderation_heldout"]["auprc"]
    assert summary["harmaug"]["auprc"]["std"] is None  # one seed
    teacher = data["ablation"]["teacher"]["openai_moderation_heldout"]
    assert teacher["f1"] == 1.0  # the placeholder teacher is exact on the placeholder rows
    assert data["ablation"]["diversity"]["synthetic"]["instructions"] > 0
    # everything stayed in the work dir: the benchmark's own MLflow store, no ./mlruns
    assert (tmp_path / "work" / "mlruns" / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()
    report = (out / "default_pack.md").read_text()
    for row in (
        "student (HarmAug)",
        "student (KD-only)",
        "| openai_moderation_heldout | teacher |",
        "DBSCAN",
    ):
        assert row in report


def test_variant_child_process_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan reaches the child intact, and the child's result comes back to the parent."""
    calls = []

    def fake_run_variant(plan: ablation.RunPlan) -> dict:
        calls.append(plan)
        return {"variant": plan.variant, "peak_rss_mib": 1.0}

    def fake_subprocess_run(command: list[str], env: dict[str, str], check: bool) -> object:
        assert command[1:3] == ["-m", "benchmarks.default_pack"]
        assert str(default_pack.REPO) in env["PYTHONPATH"].split(":")
        default_pack.main(command[3:])  # what the child process would do
        return type("Completed", (), {"returncode": 0})()

    monkeypatch.setattr(default_pack, "run_variant", fake_run_variant)
    monkeypatch.setattr(default_pack.subprocess, "run", fake_subprocess_run)
    plan = ablation.RunPlan(
        "kd_only", 43, str(tmp_path), ["--config", "cpu_tiny"], ckpt="last", max_steps=17, settings={"a": [1]}
    )
    result = default_pack.run_variant_in_child(plan)
    assert result == {"variant": "kd_only", "peak_rss_mib": 1.0}
    assert calls == [plan]


@pytest.mark.slow
def test_remote_backend_benchmark_measures_every_mode_on_the_same_rows(tmp_path: Path) -> None:
    argv = ["--rows", "4", "--gen-rows", "2", "--max-new-tokens", "2", "--concurrency", "1", "2"]
    data = remote_backend.main([*argv, "--repeats", "1", "--out-dir", str(tmp_path)])
    modes = [(r["task"], r["mode"].split()[0], r["concurrency"]) for r in data["results"]]
    assert modes == [
        (task, mode, concurrency)
        for task in ("score", "generate")
        for mode, concurrency in (("in-process", "-"), ("direct", "-"), ("http", 1), ("http", 2))
    ]
    http = [r for r in data["results"] if r["mode"].startswith("http")]
    assert all(r["rows_per_s"] > 0 and "client_cpu_ms_per_row" in r for r in http)
    # the HTTP path computes what the in-process backend computes, on the same rows
    assert all(r["max_abs_score_diff"] < 1e-5 for r in http if r["task"] == "score")
    assert all(r["same_text_as_in_process"] for r in http if r["task"] == "generate")
    assert (tmp_path / "remote_backend.md").read_text().startswith("# remote_backend")


def test_serving_benchmark_runs_every_arm_and_stops_its_servers(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import serving

    started = []
    server_init = serving.Server.__init__

    def recorded(self: Any, model: Path, threads: int, batching: list[str]) -> None:
        started.append(batching)
        server_init(self, model, threads, batching)

    monkeypatch.setattr(serving.Server, "__init__", recorded)
    data = serving.main(
        ["--student", str(tiny_export), "--formats", "ONNX int8", "--clients", "1", "2", "--duration", "1",
         "--repeats", "2", "--shape-rows", "4", "--verify-rows", "2", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    cells = data["load"]
    one_round = [("micro-batch 32", 1), ("micro-batch 32", 2), ("micro-batch 32", 2), ("batch size 1", 2)]
    assert [(c["arm"].split(",")[0], c["clients"]) for c in cells] == one_round * 2  # the arms take turns
    assert [c["round"] for c in cells] == [0] * 4 + [1] * 4
    assert all(c["errors"] == 0 and c["rows"] > 0 for c in cells)
    one_forward = [
        b for b in started if "--forward_batch_size" in b and b[b.index("--forward_batch_size") + 1] == "0"
    ]
    assert len(started) == 3 and len(one_forward) == 1  # the "one forward" arm really is one forward pass
    assert {r["rule"] for r in data["model_shapes"]["ONNX int8"]} >= {
        "batch 1",
        "32 rows, one forward (pad to longest)",
    }
    assert data["ratios"][0]["format"] == "ONNX int8" and len(data["ratios"][0]["rounds"]) == 2
    assert [f["statuses"] for f in data["fairness"]] == [[200, 200]] * 2
    assert all(f["one_row_s"] < f["large_s"] for f in data["fairness"])
    report = (tmp_path / "serving.md").read_text()
    assert "Micro-batching vs batch size 1 at 2 clients" in report and "Part 3" in report
    assert not live_children(), "the benchmark left a server running"


def live_children() -> list[int]:
    """Child processes of this test process still alive (Linux /proc)."""
    import os

    me = str(os.getpid())
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


# -- first_run -------------------------------------------------------------------------------------


def test_stack_clock_charges_time_to_the_innermost_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"value": 0.0}
    monkeypatch.setattr(first_run.time, "perf_counter", lambda: now["value"])
    monkeypatch.setattr(first_run.time, "process_time", lambda: now["value"] / 2)
    clock = first_run.StackClock()
    for name, step in [("push outer", 1), ("push inner", 2), ("pop inner", 4), ("pop outer", 8)]:
        now["value"] += step
        action, phase = name.split()
        getattr(clock, action)(phase)
    now["value"] += 16
    clock.close()
    phases = {p["phase"]: p for p in clock.report()}
    assert phases[first_run.OTHER]["wall_s"] == 1 + 16  # before "outer" opened and after it closed
    assert phases["outer"]["wall_s"] == 2 + 8 and phases["inner"]["wall_s"] == 4  # no double counting
    assert phases["inner"]["cpu_s"] == 2 and phases["outer"]["count"] == 1
    clock.pop("never opened")  # a hook without its start is ignored


def test_install_steps_come_from_the_xtrace_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "install.log"
    log.write_text(
        "+ 100.0 . scripts/install.sh\n++ 100.1 python3 -m venv .venv\nsome pip output\n"
        "++ 107.1 .venv/bin/python -m pip install torch\n++ 150.0 .venv/bin/python -m compileall\n"
        "++ 181.5 true\n"
    )
    steps = first_run.install_steps(log)
    assert steps == [
        {"command": "python3 -m venv .venv", "wall_s": 7.0},
        {"command": ".venv/bin/python -m pip install torch", "wall_s": 42.9},
        {"command": ".venv/bin/python -m compileall", "wall_s": 31.5},
    ]


def _first_run_data(commit: str, generate_s: float) -> dict:
    phases = [{"phase": "data: generate stage", "wall_s": generate_s, "cpu_s": generate_s * 1.9, "count": 1}]
    fit = {"argv": ["fit", "--config", "cpu_tiny"], "wall_s": 400.0, "cpu_s": 700.0, "phases": phases}
    fit["load_average_1min"] = {"mean": 1.2, "max": 2.0}
    install = {"wall_s": 90.0, "cpu_s": 120.0, "load_average_1min": {"mean": 1.0, "max": 1.5}, "steps": []}
    return {
        "ref": "HEAD",
        "commit": commit,
        "date": "2026-11-30 12:00",
        "cpu_count": 2,
        "total_wall_s": 490.0,
        "total_cpu_s": 820.0,
        "commands": {"install": install, "fit": fit},
        "augmentation_stats": {"instructions_kept": 171, "teacher_unsafe_rate_synthetic_prompt": 0.06},
    }


def test_first_run_report_and_comparison(tmp_path: Path) -> None:
    before, after = _first_run_data("a" * 40, 300.0), _first_run_data("b" * 40, 120.0)
    markdown = first_run.render(after)
    assert "| harmaug fit: whole process | 400 | 700 |" in markdown
    assert "|   data: generate stage | 120 | 228 |" in markdown
    assert "| instructions_kept | 171 |" in markdown and "fit 1.2 (max 2.0)" in markdown
    paths = [tmp_path / "before.json", tmp_path / "after.json"]
    for path, data in zip(paths, (before, after)):
        path.write_text(json.dumps(data))
    table = first_run.compare(*paths, out_dir=tmp_path)
    assert "|   data: generate stage | 300 | 120 | 570 | 228 |" in table
    assert json.loads((tmp_path / "first_run_compare.json").read_text())["after"]["commit"] == "b" * 40


@pytest.mark.slow
def test_first_run_probe_times_a_real_fit_by_phase(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path
) -> None:
    import os
    import subprocess
    import sys

    pack = tiny_pack(tmp_path, tiny_llama, tiny_student)
    result = tmp_path / "phases.json"
    root = Path(first_run.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, first_run.__file__, "--probe", str(result), "fit", "--config", str(pack)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    data = json.loads(result.read_text())
    phases = {p["phase"]: p for p in data["phases"]}
    for name in (
        "python interpreter start-up",
        "model load: chat LLM (generator/responder)",
        "model load: student",
        "data: generate stage",
        "data: respond stage",
        "data: label stage",
        "data: label_eval stage",
        "validation: sanity check",
        "train epoch 1",
        "validation after epoch 1",
        "export: guard folder + MLflow artifacts",
        "test: loop over the eval sets",  # the pack's test_after_fit
        "test: report",
    ):
        assert phases[name]["wall_s"] >= 0 and phases[name]["count"] >= 1, name
    total = sum(p["wall_s"] for p in data["phases"])
    assert total == pytest.approx(data["wall_s"], rel=0.05)  # every second charged once
    assert data["exit_status"] in (0, None) and data["best_model_path"].endswith(".ckpt")
    assert data["test_ran"] is True  # the fit ends with the test pass: no separate `harmaug test`


def test_perturbation_benchmark_scores_every_rewrite_without_and_with_the_normaliser(
    tiny_bert_export: Path, tmp_path: Path
) -> None:
    from benchmarks.perturbation import main as perturbation_main
    from harmaug_pl.evaluation.perturbation import PERTURBATIONS

    data = perturbation_main(["--model", str(tiny_bert_export), "--rows", "24", "--out-dir", str(tmp_path)])
    assert data["rows"] == 24 and set(data["auprc"]) == {"clean", *(p.label for p in PERTURBATIONS.values())}
    assert all(set(by_arm) == {"as exported", "normalised"} for by_arm in data["auprc"].values())
    assert "| fullwidth |" in (tmp_path / "perturbation.md").read_text()


def test_hostile_input_benchmark_gets_clean_answers_and_leaves_the_server_alive(
    tiny_bert_export: Path, tmp_path: Path
) -> None:
    from benchmarks.hostile_input import main as hostile_main

    data = hostile_main(
        [
            "--student",
            str(tiny_bert_export),
            "--repeats",
            "1",
            "--read-timeout-s",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    statuses = {row["request"].split(" #")[0]: row["status"] for row in data["rows"]}
    assert statuses["20 x (100k + 100k chars) /v1/classify"] == 200
    assert statuses["lone surrogate + 31 valid, concurrent"] == 422
    assert all("valid 200s 31/31" in r["note"] for r in data["rows"] if r["request"].startswith("lone"))
    assert statuses['threshold "0.5"'] == 422
    assert statuses["server alive afterwards (/ready)"] == 200
    stalls = [r["seconds"] for r in data["rows"] if r["status"] == "closed"]
    assert len(stalls) == 2 and all(s < 30 for s in stalls)  # the read timeout closed both
    assert "one-row request" in (tmp_path / "hostile_input.md").read_text()
    assert not live_children(), "the benchmark left a server running"
