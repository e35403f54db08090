"""What every benchmark shares: the default pack's settings, memory readings, the results writer."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from harmaug_pl.cli.packs import shipped_config
from harmaug_pl.evaluation.cost_profile import proc_status_kib

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_PACK = "cpu_tiny"


def pack_config(name: str = DEFAULT_PACK) -> dict[str, Any]:
    """A pack file, or a shipped pack by name, as plain YAML data (no interpolation)."""
    path = name if Path(name).is_file() else shipped_config(name)
    if path is None:
        raise SystemExit(f"{name!r} is neither a pack file nor the name of a shipped pack")
    return yaml.safe_load(Path(path).read_text())


def peak_rss_mib() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since start), in MiB.

    Resetting also lowers what ``getrusage``'s ``ru_maxrss`` reports afterwards, so a process that
    resets must take its overall peak as the maximum of its phases' peaks.
    """
    hwm = proc_status_kib("VmHWM")
    if hwm is None:  # no /proc (not Linux): ru_maxrss, which cannot be reset
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(hwm / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so the next phase's peak is its own (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhaseClock:
    """Wall time and peak RSS per named phase, phases measured one after another."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every phase (a new run starts)."""
        self.phases: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._started = 0.0

    @property
    def current(self) -> str | None:
        """The running phase, if any."""
        return self._name

    def start(self, name: str) -> None:
        """End the running phase (if any) and start ``name``."""
        self.stop()
        reset_peak_rss()
        self._name, self._started = name, time.perf_counter()

    def stop(self) -> None:
        if self._name is None:
            return
        entry = self.phases.setdefault(self._name, {"seconds": 0.0, "peak_rss_mib": 0.0})
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - self._started, 2)
        entry["peak_rss_mib"] = max(entry["peak_rss_mib"], peak_rss_mib())
        self._name = None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU count, torch threads, versions."""
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant decimals at most."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: str | Path = RESULTS_DIR) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``, print the markdown; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    return out / f"{name}.json"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for a server a benchmark or test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to a server started in its own session (its PID names the group: children included),
    SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (this process when None)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def process_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` now, in MiB."""
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
