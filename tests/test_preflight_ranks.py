"""The automatic preflight of a multi-process launch: every rank reaches the same verdict.

Two real processes on loopback with the environment torchrun or srun gives a rank; only one of them
finds a blocker. Both must stop with the same error, in seconds, and neither wait for the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harmaug_pl.preflight import CheckRow
from harmaug_pl.preflight.ranks import Rendezvous, agreed_error, launch_rendezvous, verdict
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
RANK = r"""
import os, sys
from harmaug_pl.preflight import CheckRow, PreflightError
from harmaug_pl.preflight.automatic import settle

rank, blocked, then_init = int(os.environ["RANK"]), sys.argv[1], sys.argv[2] == "init"
status = "blocker" if str(rank) in blocked.split(",") else "ok"
rows = [CheckRow("model", "student org/m", status, f"seen by rank {rank}")]
try:
    settle(rows, "fit", 0.1)
except PreflightError as err:
    print("STOPPED:", err, flush=True)
    sys.exit(2)
if then_init:  # what Lightning does next: init_process_group(env://) on the same address and port
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=2)
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    print("SUM", int(total), flush=True)
    dist.destroy_process_group()
print("PASSED", flush=True)
"""


def launch(
    blocked: str,
    then_init: bool = False,
    agent_port: int | None = None,
    ranks: tuple[int, ...] = (0, 1),
    timeout_s: int = 60,
) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks as torchrun starts them (the agent's store when ``agent_port`` is set)."""
    port = agent_port or free_port()
    procs = []
    for rank in ranks:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TORCHELASTIC_RUN_ID": "test",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": str(agent_port is not None),
            "HARMAUG_PREFLIGHT_RANK_TIMEOUT": str(timeout_s),
        }
        args = [sys.executable, "-c", RANK, blocked, "init" if then_init else "-"]
        procs.append(
            subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout_s + 90)  # imports on a loaded machine
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


def stopped_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("STOPPED:")]
    assert result.returncode == 2 and len(lines) == 1, result.stdout
    return lines[0]


@pytest.mark.slow
def test_one_rank_with_a_blocker_stops_both_ranks_alike() -> None:
    first, second = launch(
        blocked="1"
    )  # rank 0 hosts the store, as under srun or torchrun without an agent store
    assert stopped_line(first) == stopped_line(second)
    assert "on 1 of 2 ranks" in stopped_line(first) and "rank 1 (" in stopped_line(first)
    assert "seen by rank 1" in stopped_line(first) and "rank 0 (" not in stopped_line(first)


@pytest.mark.slow
def test_ranks_that_agree_go_on_to_init_the_process_group_on_the_same_port() -> None:
    for result in launch(blocked="", then_init=True):
        assert result.returncode == 0 and "SUM 3" in result.stdout and "PASSED" in result.stdout, (
            result.stdout
        )


@pytest.mark.slow
def test_torchrun_agent_store_and_a_rank_that_never_reports() -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = free_port()
    agent = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    first, second = launch(blocked="0,1", agent_port=port)
    assert stopped_line(first) == stopped_line(second) and "on 2 of 2 ranks" in stopped_line(first)
    del agent
    (alone,) = launch(blocked="", ranks=(0,), timeout_s=3)  # rank 1 never starts: rank 0 stops in 3 s
    assert "rank(s) 1 of 2 sent no preflight verdict within 3 s" in stopped_line(alone)


def test_which_launches_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith(("SLURM_", "TORCHELASTIC_"))] + [
        "MASTER_PORT"
    ]:
        monkeypatch.delenv(name, raising=False)
    assert launch_rendezvous() is None  # one process pays nothing
    lightning_child = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    for name, value in lightning_child.items():
        monkeypatch.setenv(name, value)
    assert launch_rendezvous() is None  # Lightning's launcher: rank 0 checked before starting it
    slurm = {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "3",
        "SLURM_JOB_ID": "81234",
        "SLURM_NODELIST": "gpu[07-08]",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR")
    assert launch_rendezvous() == Rendezvous(3, 4, "gpu07", 16234, agent_store=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning does not use SLURM's ranks then
    assert launch_rendezvous() is None
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert launch_rendezvous() == Rendezvous(1, 2, "h", 29500, agent_store=True, attempt="2")


def test_the_agreed_error_names_each_rank_and_its_first_blocker() -> None:
    row = CheckRow("data", "seed data", "blocker", "data/seed.jsonl is missing", "fix it")
    ok, blocked, crashed = verdict([]), verdict([row, row]), verdict([], failure="OSError: disk")
    assert agreed_error([ok, ok], "fit") is None
    error = str(agreed_error([ok, blocked, crashed], "augment"))
    assert "this augment on 2 of 3 ranks" in error
    assert (
        "rank 1 (" in error and "2 blocker(s), first: data of seed data: data/seed.jsonl is missing" in error
    )
    assert "rank 2 (" in error and "the preflight raised OSError: disk" in error and "rank 0" not in error
