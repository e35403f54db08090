"""The preflight's rows as a text table and a one-line summary."""

from __future__ import annotations

from harmaug_pl.preflight import CheckRow

SUBJECT_WIDTH = 56


WHAT_WIDTH = 22


def format_table(rows: list[CheckRow]) -> str:
    """Rows as an aligned text table; a failing row's fix goes on the line below its detail."""
    lines = [f"{'status':<8} {'check':<{WHAT_WIDTH}} {'subject':<{SUBJECT_WIDTH}} detail"]
    indent = " " * (10 + WHAT_WIDTH + SUBJECT_WIDTH)
    for row in rows:
        status = row.status.upper() if row.status == "blocker" else row.status
        lines.append(f"{status:<8} {row.what:<{WHAT_WIDTH}} {row.subject:<{SUBJECT_WIDTH}} {row.detail}")
        if row.fix and row.status != "ok":
            lines.append(f"{indent}fix: {row.fix}")
    return "\n".join(lines)


def summary(rows: list[CheckRow], seconds: float) -> str:
    counts = {status: sum(row.status == status for row in rows) for status in ("ok", "warn", "blocker")}
    return (
        f"{len(rows)} rows: {counts['ok']} ok, {counts['warn']} warning(s), {counts['blocker']} "
        f"blocker(s) ({seconds:.1f} s)"
    )
