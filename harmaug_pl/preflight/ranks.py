"""One preflight verdict for every rank of a multi-process launch.

Every rank runs the automatic preflight (its own node's caches and disks). Were each rank to stop on
its own blockers alone, a rank that found one would exit while the others waited for it at their
first collective until the process group timed out. So a launch whose ranks all start at once
(torchrun, srun) exchanges the verdicts before anything loads, through the same c10d store the
process group will use, and every rank raises the same :class:`PreflightError` naming which ranks
found which blockers:

- torchrun (``TORCHELASTIC_RUN_ID`` set): the elastic agent hosts the store when
  ``TORCHELASTIC_USE_AGENT_STORE=True`` (every rank is a client), else rank 0 hosts it;
- srun (Lightning's ``SLURMEnvironment``): rank 0 hosts it at the address and port Lightning will use.

A store rank 0 hosts is multi-tenant and kept open, so ``init_process_group`` (env://, any backend)
later in the same process reuses its server on the same port instead of binding it again. Lightning's
own launcher (one command; the Trainer starts ranks 1..N-1 as children once rank 0 is past its
preflight) has no peers to exchange with: each child checks the same node again, and a child that
stops makes Lightning's child-process observer end every rank. A single process pays nothing.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from harmaug_pl.preflight import CheckRow, PreflightError

TIMEOUT_ENV = "HARMAUG_PREFLIGHT_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT_S = 600.0  # ranks of one launch may start minutes apart (container pulls, imports)
KEY_PREFIX = "harmaug/preflight"
_kept: list[Any] = []  # stores rank 0 hosts: their server must outlive the preflight (see module doc)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of this launch meet: ``rank`` of ``world_size`` at ``host:port``."""

    rank: int
    world_size: int
    host: str
    port: int
    agent_store: bool  # torchrun's agent hosts the store; otherwise rank 0 does
    attempt: str = "0"  # torchrun's restart count: a restarted launch never reads the last one's verdicts


def launch_rendezvous() -> Rendezvous | None:
    """The rendezvous of a torchrun or srun launch with several ranks, found as Lightning picks its
    cluster environment (TorchElastic first, then SLURM); ``None`` for one process and for the ranks
    of Lightning's own launcher."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None:  # torch.distributed.is_torchelastic_launched()
        world_size = int(env.get("WORLD_SIZE", "1"))
        if world_size < 2:
            return None
        return Rendezvous(
            rank=int(env["RANK"]),
            world_size=world_size,
            host=env["MASTER_ADDR"],
            port=int(env["MASTER_PORT"]),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True),
            attempt=env.get("TORCHELASTIC_RESTART_COUNT", "0"),
        )
    if int(env.get("SLURM_NTASKS", "1")) < 2:
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        slurm = SLURMEnvironment()  # the address and port Lightning's process group will use
        return Rendezvous(
            rank=slurm.global_rank(),
            world_size=slurm.world_size(),
            host=slurm.main_address,
            port=slurm.main_port,
            agent_store=False,
        )
    return None


def rank_timeout() -> float:
    """Seconds a rank waits for the others' verdicts (``HARMAUG_PREFLIGHT_RANK_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_RANK_TIMEOUT_S
    except ValueError:
        raise PreflightError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _store(where: Rendezvous, timeout: float) -> Any:
    from torch.distributed import PrefixStore, TCPStore

    hosts = where.rank == 0 and not where.agent_store
    store = TCPStore(
        where.host,
        where.port,
        is_master=hosts,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
        multi_tenant=not where.agent_store,  # as torch's env:// store, whose server it then shares
    )
    if hosts:
        _kept.append(store)
    return PrefixStore(f"{KEY_PREFIX}/attempt_{where.attempt}/", store)


def exchange(mine: dict[str, Any], where: Rendezvous, timeout: float | None = None) -> list[dict[str, Any]]:
    """Every rank's verdict (``mine`` on this rank), in rank order, through the launch's c10d store.

    Raises :class:`PreflightError` when the store cannot be reached or a rank does not report within
    ``timeout`` seconds (a rank that crashed before its preflight).
    """
    timeout = rank_timeout() if timeout is None else timeout
    keys = [f"rank{rank}" for rank in range(where.world_size)]
    try:
        store = _store(where, timeout)
        store.set(keys[where.rank], json.dumps(mine))
    except Exception as err:
        raise PreflightError(
            f"rank {where.rank}: could not reach the c10d store at {where.host}:{where.port} to share the "
            f"preflight verdict with the other ranks ({type(err).__name__}: {err}); skip the preflight "
            "with --preflight=false or HARMAUG_PREFLIGHT=0"
        ) from err
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as err:
        silent = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise PreflightError(
            f"rank(s) {', '.join(map(str, silent))} of {where.world_size} sent no preflight verdict within "
            f"{timeout:g} s ({TIMEOUT_ENV}); every rank stops here (see their logs)"
        ) from err
    return [json.loads(store.get(key)) for key in keys]


def verdict(blockers: list[CheckRow], failure: str | None = None) -> dict[str, Any]:
    """What a rank tells the others: its host, its blockers, or the error its preflight raised."""
    return {
        "host": socket.gethostname(),
        "failure": failure,
        "blockers": [[row.what, row.subject, row.detail] for row in blockers],
    }


def agreed_error(verdicts: list[dict[str, Any]], command: str) -> PreflightError | None:
    """The one error every rank raises when any rank found a blocker (or its preflight failed)."""
    parts = []
    for rank, seen in enumerate(verdicts):
        if seen["failure"]:
            parts.append(f"rank {rank} ({seen['host']}): the preflight raised {seen['failure']}")
        elif seen["blockers"]:
            what, subject, detail = seen["blockers"][0]
            parts.append(
                f"rank {rank} ({seen['host']}): {len(seen['blockers'])} blocker(s), first: {what} of "
                f"{subject}: {detail}"
            )
    if not parts:
        return None
    return PreflightError(
        f"the preflight would stop this {command} on {len(parts)} of {len(verdicts)} ranks (nothing was "
        f"loaded; every rank stops alike): " + "; ".join(parts) + ". Fix them (`harmaug check` with the "
        "same --config and overrides, on the named host, prints the full table) or skip this check with "
        "--preflight=false or HARMAUG_PREFLIGHT=0"
    )
