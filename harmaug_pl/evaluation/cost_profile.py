"""Student vs teacher cost: latency, throughput, peak memory, parameters and FLOPs per row."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

Scorer = Any  # has score(prompts, responses) -> list[float]


def proc_status_kib(field: str) -> int | None:
    """A ``VmXXX:`` field of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory of what runs between :meth:`start` and :meth:`stop`, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (everything allocated, weights included). On CPU: the
    rise of the process's peak RSS over its RSS at ``start`` (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``), so memory already held before ``start`` is not counted.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_peak_allocated" if self.cuda else "rss_rise"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.baseline = proc_status_kib("VmRSS")

    def stop(self) -> float | None:
        if self.cuda:
            torch.cuda.synchronize()
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak = proc_status_kib("VmHWM")
        if peak is None or self.baseline is None:
            return None
        return round((peak - self.baseline) / 1024, 1)


def count_parameters(scorer: Scorer) -> int | None:
    """Parameters of the torch model behind a scorer, if there is one we can find."""
    for owner in (scorer, getattr(scorer, "runner", None), getattr(scorer, "backend", None)):
        for name in ("model", "_model", "lm"):  # guards, classifier teachers, LLM backends
            model = getattr(owner, name, None)
            if isinstance(model, torch.nn.Module):
                return sum(p.numel() for p in model.parameters())
    return None


def flops_per_example(
    scorer: Scorer, prompts: Sequence[str], responses: Sequence[str | None]
) -> float | None:
    """Mean torch FLOPs to score one row (``None`` when no torch op ran: ONNX, scikit-learn)."""
    totals = []
    for prompt, response in zip(prompts, responses):
        counter = FlopCounterMode(display=False)
        with counter:
            scorer.score([prompt], [response])
        totals.append(counter.get_total_flops())
    return float(statistics.mean(totals)) if totals and any(totals) else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def profile_scorer(
    name: str,
    load: Callable[[], Scorer],
    prompts: Sequence[str],
    responses: Sequence[str | None],
    *,
    batch_size: int = 32,
    latency_rows: int = 32,
    flop_rows: int = 4,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], list[float]]:
    """Load and profile one scorer; returns its cost row and its batched scores of every row.

    Memory covers loading, warm-up and every timed call, so a scorer loaded here has its weights in
    the figure (on CPU, a scorer loaded before ``load`` is called counts only what scoring adds).
    """
    probe = MemoryProbe(device)
    probe.start()
    started = time.perf_counter()
    scorer = load()
    scorer.score(list(prompts[:2]), list(responses[:2]))  # warm-up: lazy loading, first-call costs
    load_s = time.perf_counter() - started
    latencies = []
    for prompt, response in zip(prompts[:latency_rows], responses[:latency_rows]):
        started = time.perf_counter()
        scorer.score([prompt], [response])
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    kwargs = {"batch_size": batch_size} if _takes_batch(scorer) else {}  # teachers use their own
    scores = list(scorer.score(list(prompts), list(responses), **kwargs))
    batched_s = time.perf_counter() - started
    peak = probe.stop()
    row = {
        "name": name,
        "parameters": count_parameters(scorer),
        "load_s": round(load_s, 2),
        "latency_p50_ms": round(_percentile(latencies, 0.5), 2),
        "latency_p95_ms": round(_percentile(latencies, 0.95), 2),
        "throughput_rows_per_s": round(len(prompts) / batched_s, 1),
        "batch_size": batch_size,
        "peak_memory_mib": peak,
        "memory_kind": probe.kind,
        "flops_per_example": flops_per_example(scorer, prompts[:flop_rows], responses[:flop_rows]),
        "rows": len(prompts),
    }
    return row, scores


def _takes_batch(scorer: Scorer) -> bool:
    """Guards take ``batch_size`` per call; teachers have their own (``scorer.batch_size``)."""
    return "batch_size" in inspect.signature(scorer.score).parameters


def with_ratios(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Add ``x <reference>`` ratios: how many times the row's cost is the reference row's."""
    ref = next(row for row in rows if row["name"] == reference)
    for row in rows:
        for key in (
            "parameters",
            "latency_p50_ms",
            "throughput_rows_per_s",
            "peak_memory_mib",
            "flops_per_example",
        ):
            a, b = row.get(key), ref.get(key)
            row[f"{key}_ratio"] = float(f"{a / b:.4g}") if a and b else None
    return rows


COLUMNS = (
    ("name", "scorer"),
    ("parameters", "params"),
    ("latency_p50_ms", "p50 ms (batch 1)"),
    ("latency_p95_ms", "p95 ms (batch 1)"),
    ("throughput_rows_per_s", "rows/s (batched)"),
    ("peak_memory_mib", "peak MiB"),
    ("flops_per_example", "GFLOPs/row"),
    ("latency_p50_ms_ratio", "p50 ratio"),
    ("throughput_rows_per_s_ratio", "throughput ratio"),
    ("peak_memory_mib_ratio", "memory ratio"),
)


def markdown(rows: list[dict[str, Any]], extra: Sequence[tuple[str, str]] = ()) -> str:
    """The cost table; ratios are relative to the first row's scorer."""
    columns = (*COLUMNS, *extra)

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "n/a"
        if key == "flops_per_example":
            return f"{value / 1e9:.3g}"
        if key == "parameters":
            return f"{value / 1e6:.1f}M"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
