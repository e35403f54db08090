"""The README's main command from a fresh clone, timed per phase: wall and process CPU time.

Clones this repository (``--ref``, default ``HEAD``; uncommitted changes are not in the clone) into a
temporary directory, runs ``bash scripts/install.sh`` there with empty pip and uv caches, then
``.venv/bin/harmaug fit --config cpu_tiny`` (and ``harmaug test`` on the best checkpoint when the fit
does not end with the test pass itself). The fit runs under a probe, this file run as a script by the
clone's own Python: it is the ``harmaug`` console script plus wrappers around the project's model
loaders, cache stages, export and report callbacks, and one Lightning callback, which charge every
second of wall and CPU time to the innermost phase running (a stack, so phases never count twice).

    python -m benchmarks.first_run [--ref REF] [--workdir DIR] [--keep]
    python -m benchmarks.first_run --compare before.json after.json     # side by side

The machine is shared on this project's development boxes: the report gives the load average seen
during every command, and CPU time next to wall time (CPU time moves much less with the load).
Only the standard library is imported at module level: the probe runs in the clone's virtualenv,
whose ``benchmarks`` package may be an older one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

NAME = "first_run"
REPO = Path(__file__).resolve().parent.parent
PACK = "cpu_tiny"
INSTALL_TRACE = re.compile(r"^\++ (\d+\.\d+) (.*)$")
OTHER = "other (Lightning and CLI work between the phases below)"


# -- the probe: runs inside the timed process ------------------------------------------------------


class StackClock:
    """Wall and CPU seconds per phase; time is charged to the innermost open phase (else ``OTHER``)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = {}
        self.stack: list[str] = []
        self._mark = (time.perf_counter(), time.process_time())

    def add(self, name: str, wall: float, cpu: float) -> None:
        entry = self.totals.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "count": 0})
        entry["wall_s"] += wall
        entry["cpu_s"] += cpu

    def _charge(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.add(self.stack[-1] if self.stack else OTHER, wall - self._mark[0], cpu - self._mark[1])
        self._mark = (wall, cpu)

    def push(self, name: str) -> None:
        self._charge()
        self.stack.append(name)
        self.add(name, 0.0, 0.0)
        self.totals[name]["count"] += 1

    def pop(self, name: str) -> None:
        """Close ``name`` (and anything left open inside it); unknown names are ignored."""
        if name not in self.stack:
            return
        self._charge()
        while self.stack and self.stack.pop() != name:
            pass

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop(name)

    def close(self) -> None:
        self._charge()
        self.stack.clear()

    def report(self) -> list[dict[str, Any]]:
        return [
            {
                "phase": name,
                "wall_s": round(v["wall_s"], 2),
                "cpu_s": round(v["cpu_s"], 2),
                "count": v["count"],
            }
            for name, v in self.totals.items()
        ]


CLOCK = StackClock()


def seconds_since_process_start() -> float:
    """How long this process has existed, so interpreter start-up is counted too. (psutil, not
    benchmarks.common: this script measures a first run, so it imports nothing heavy itself.)"""
    return time.time() - psutil.Process().create_time()


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def timed(name: str | Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` charged to the phase ``name`` (or ``name(*args, **kwargs)``)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with CLOCK.phase(name(*args, **kwargs) if callable(name) else name):
            return function(*args, **kwargs)

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


def _patch(owner: Any, attribute: str, name: str | Callable[..., str]) -> None:
    setattr(owner, attribute, timed(name, getattr(owner, attribute)))


def install_probes() -> Any:
    """Wrap the project's slow calls in phases; returns the Lightning callback class to add."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from harmaug_pl.augment import chat_stage, pipeline
    from harmaug_pl.backends import transformers_backend
    from harmaug_pl.training import datamodule, distillation
    from harmaug_pl.training.callbacks import eval_plots, eval_reporter, guard_registry, student_export

    _patch(transformers_backend, "load_causal_lm", "model load: chat LLM (generator/responder)")
    _patch(distillation, "load_sequence_classifier", "model load: student")
    for owner in (transformers_backend, datamodule):
        _patch(owner, "load_tokenizer", "tokenizer loads")
    for owner in (chat_stage, pipeline):
        _patch(owner, "run_stage", lambda cache_dir, stage, *a, **k: f"data: {stage} stage")
    _patch(datamodule.HarmAugDataModule, "setup", "data: setup (seed/eval rows, split)")
    _patch(student_export.StudentExport, "on_fit_end", "export: guard folder + MLflow artifacts")
    _patch(eval_reporter.EvalReporter, "on_test_end", "test: report")
    _patch(eval_plots.EvalPlots, "on_test_end", "test: plots")
    _patch(guard_registry.GuardRegistry, "on_test_end", "test: log + register the MLflow guard model")
    _patch(ModelCheckpoint, "_save_checkpoint", "checkpoint saves")
    getter = MLFlowLogger.experiment.fget
    MLFlowLogger.experiment = property(timed("MLflow: store set-up and run creation", getter))

    class PhaseProbe(L.Callback):
        """Lightning's loops as phases: sanity check, each training epoch, each validation, the test."""

        def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.push("validation: sanity check")

        def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.pop("validation: sanity check")

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.push(f"train epoch {trainer.current_epoch + 1}")

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.pop(f"train epoch {trainer.current_epoch + 1}")

        def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                CLOCK.push(f"validation after epoch {trainer.current_epoch + 1}")

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                CLOCK.pop(f"validation after epoch {trainer.current_epoch + 1}")

        def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.push("test: loop over the eval sets")

        def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            CLOCK.pop("test: loop over the eval sets")

    return PhaseProbe


def probe_main(result_file: Path, argv: list[str]) -> None:
    """``harmaug <argv>`` in this process, every phase timed; the timings go to ``result_file``."""
    started_at = time.time()
    CLOCK.add("python interpreter start-up", seconds_since_process_start(), time.process_time())
    CLOCK.totals["python interpreter start-up"]["count"] = 1
    load_start = load_average()
    with CLOCK.phase("imports (harmaug_pl.cli: torch, lightning, transformers, mlflow...)"):
        from harmaug_pl.cli import lightning_cli as cli
    probe = install_probes()
    sys.modules["__main__"].PhaseProbe = probe  # the CLI imports callbacks by class path
    sys.argv = ["harmaug", *argv, "--trainer.callbacks+=__main__.PhaseProbe"]
    status: int | str | None = 0
    built = None
    try:
        built = cli.main()
    except SystemExit as stop:
        status = stop.code
    CLOCK.close()
    trainer = getattr(built, "trainer", None)
    checkpoint = getattr(trainer, "checkpoint_callback", None)
    result = {
        "argv": argv,
        "exit_status": status,
        "started_at": started_at,
        "wall_s": round(seconds_since_process_start(), 2),
        "cpu_s": round(time.process_time(), 2),
        "load_average_1min": {"start": load_start, "end": load_average()},
        "torch_threads": _torch_threads(),
        "best_model_path": getattr(checkpoint, "best_model_path", "") or "",
        "test_ran": "test: loop over the eval sets" in CLOCK.totals,
        "phases": CLOCK.report(),
    }
    result_file.write_text(json.dumps(result, indent=2))
    if status not in (0, None):
        raise SystemExit(status)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


# -- the driver: clone, install, run, report ---------------------------------------------------------


class LoadSampler:
    """The 1-minute load average every few seconds while a command runs (mean and max)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(load_average())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": max(self.samples)}


def run_command(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``command``; its wall and CPU time (children's rusage) and the load while it ran."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with LoadSampler() as load, log.open("w") as out:
        completed = subprocess.run(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if completed.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(command)} failed with status {completed.returncode}:\n{tail}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_average_1min": load.summary(),
        "log": str(log),
    }


def install_steps(log: Path) -> list[dict[str, Any]]:
    """Each command of ``scripts/install.sh`` that took 0.5 s or more, from its xtrace timestamps."""
    trace = [INSTALL_TRACE.match(line) for line in log.read_text(errors="replace").splitlines()]
    marks = [(float(m.group(1)), m.group(2)) for m in trace if m]
    steps = []
    for (start, command), (end, _) in zip(marks, [*marks[1:], (marks[-1][0], "")]):
        if end - start >= 0.5:
            steps.append({"command": command[:160], "wall_s": round(end - start, 2)})
    return steps


def fresh_clone(ref: str, workdir: Path) -> tuple[Path, str]:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty and ref == "HEAD":
        print("note: uncommitted changes are not measured (the clone is of the commit)", file=sys.stderr)
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)
    return clone, commit


def _with_probe(command: dict[str, Any], result: Path) -> dict[str, Any]:
    """A command's outside measurements plus what its probe saw inside; the outside ones win (the
    process's whole wall/CPU time and the load sampled all along, not the probe's start/end load)."""
    return {**json.loads(result.read_text()), **command}


def probe_command(clone: Path, result: Path, argv: list[str]) -> list[str]:
    return [
        str(clone / ".venv" / "bin" / "python"),
        str(Path(__file__).resolve()),
        "--probe",
        str(result),
        *argv,
    ]


def run(
    ref: str = "HEAD",
    workdir: str | Path | None = None,
    keep: bool = False,
    out_dir: str | Path | None = None,
    name: str = NAME,
) -> dict[str, Any]:
    """Clone, install, fit (+ test when the fit has no test pass), and write the report."""
    from benchmarks.common import RESULTS_DIR, write_results

    root = Path(workdir or tempfile.mkdtemp(prefix="harmaug-first-run-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"--workdir {root} is not empty: a first run needs an empty directory")
    try:
        clone, commit = fresh_clone(ref, root)
        env = {**os.environ, "PIP_CACHE_DIR": str(root / "pip-cache"), "UV_CACHE_DIR": str(root / "uv-cache")}
        logs = root / "logs"
        logs.mkdir()
        # xtrace with a timestamp per command (the single quotes defer ${EPOCHREALTIME} to each line);
        # the closing `:` stamps the end of the script's last command
        trace = ["bash", "-c", "PS4='+ ${EPOCHREALTIME} '; set -x; . \"$0\"; :", "scripts/install.sh"]
        install = run_command(trace, clone, env, logs / "install.log")
        install["steps"] = install_steps(logs / "install.log")
        commands: dict[str, Any] = {"install": install}
        (root / "commands.json").write_text(json.dumps(commands, indent=2))  # kept if the fit never ends
        fit_result = root / "fit_phases.json"
        commands["fit"] = run_command(
            probe_command(clone, fit_result, ["fit", "--config", PACK]), clone, env, logs / "fit.log"
        )
        commands["fit"] = _with_probe(commands["fit"], fit_result)
        if not commands["fit"]["test_ran"] and commands["fit"]["best_model_path"]:
            test_result = root / "test_phases.json"
            argv = ["test", "--config", PACK, "--ckpt_path", commands["fit"]["best_model_path"]]
            commands["test"] = run_command(
                probe_command(clone, test_result, argv), clone, env, logs / "test.log"
            )
            commands["test"] = _with_probe(commands["test"], test_result)
        stats_file = clone / "runs" / PACK / "data" / "stats.json"
        data = {
            "benchmark": name,
            "ref": ref,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_count": os.cpu_count(),
            "total_wall_s": round(sum(c["wall_s"] for c in commands.values()), 1),
            "total_cpu_s": round(sum(c["cpu_s"] for c in commands.values()), 1),
            "commands": commands,
            "augmentation_stats": json.loads(stats_file.read_text()) if stats_file.is_file() else {},
        }
        write_results(name, data, render(data), out_dir or RESULTS_DIR)
        return data
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------------


def phase_rows(data: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, wall s, CPU s) of every command and phase, in run order, totals last."""
    rows: list[tuple[str, float, float]] = []
    for command, values in data["commands"].items():
        if command == "install":
            rows.append(("install (scripts/install.sh)", values["wall_s"], values["cpu_s"]))
            continue
        label = "harmaug " + " ".join(values["argv"][:1])
        rows.append((f"{label}: whole process", values["wall_s"], values["cpu_s"]))
        rows += [(f"  {p['phase']}", p["wall_s"], p["cpu_s"]) for p in values["phases"]]
    rows.append(("total: install + commands", data["total_wall_s"], data["total_cpu_s"]))
    return rows


def render(data: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    loads = ", ".join(
        f"{name} {c['load_average_1min']['mean']} (max {c['load_average_1min']['max']})"
        for name, c in data["commands"].items()
    )
    out = [
        "## First run from a fresh clone: "
        f"`bash scripts/install.sh && .venv/bin/harmaug fit --config {PACK}`\n",
        f"commit {data['commit'][:10]} ({data['ref']}), {data['date']}, {data['cpu_count']} CPUs, empty pip "
        f"and uv caches; 1-minute load average while running (mean): {loads}.\n",
        markdown_table(["phase", "wall s", "CPU s"], phase_rows(data)),
        "",
        "Install steps (wall s): "
        + "; ".join(f"`{s['command']}` {s['wall_s']}" for s in data["commands"]["install"]["steps"]),
    ]
    stats = data.get("augmentation_stats") or {}
    keys = [key for key in sorted(stats) if key.startswith(("instructions_", "teacher_unsafe_rate"))]
    if keys:
        out += ["", markdown_table(["augmentation statistic", "value"], [[k, stats[k]] for k in keys])]
    return "\n".join(out)


def compare(before: Path, after: Path, out_dir: str | Path | None = None) -> str:
    """Two first-run reports side by side, phase by phase."""
    from benchmarks.common import RESULTS_DIR, markdown_table, write_results

    runs = [json.loads(Path(path).read_text()) for path in (before, after)]
    tables = [{name: (wall, cpu) for name, wall, cpu in phase_rows(run)} for run in runs]
    names = list(tables[1]) + [name for name in tables[0] if name not in tables[1]]
    rows = []
    for name in names:
        b, a = tables[0].get(name, ("", "")), tables[1].get(name, ("", ""))
        rows.append([name, b[0], a[0], b[1], a[1]])
    headers = [
        "phase",
        f"wall s {runs[0]['commit'][:7]}",
        f"wall s {runs[1]['commit'][:7]}",
        f"CPU s {runs[0]['commit'][:7]}",
        f"CPU s {runs[1]['commit'][:7]}",
    ]
    markdown = "## First run, before vs after\n\n" + markdown_table(headers, rows)
    write_results(f"{NAME}_compare", {"before": runs[0], "after": runs[1]}, markdown, out_dir or RESULTS_DIR)
    return markdown


def main(argv: list[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--probe"]:  # inside the clone's virtualenv: the timed command itself
        return probe_main(Path(args[1]), args[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", default="HEAD", help="commit of this repository to clone (default HEAD)")
    parser.add_argument("--workdir", default=None, help="empty directory for the clone (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the clone, its .venv and its runs")
    parser.add_argument("--name", default=NAME, help="results file name (first_run.json/.md)")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results")
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="render two reports side by side"
    )
    parsed = parser.parse_args(args)
    if parsed.compare:
        return compare(Path(parsed.compare[0]), Path(parsed.compare[1]), parsed.out_dir)
    return run(parsed.ref, parsed.workdir, parsed.keep, parsed.out_dir, parsed.name)


if __name__ == "__main__":
    main()
