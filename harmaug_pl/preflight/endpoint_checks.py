"""The rows of a served model (:class:`OpenAICompatibleBackend`), built from its endpoint probe.

The backend reports plain data (:func:`~harmaug_pl.backends.remote.probe.probe_endpoint`); what is
a blocker and what to change is decided here, where the other rows are.
"""

from __future__ import annotations

from harmaug_pl.backends import OpenAICompatibleBackend
from harmaug_pl.preflight import CheckRow


def endpoint_rows(backend: OpenAICompatibleBackend) -> list[CheckRow]:
    """Key variable, endpoint, served model, log-probabilities, tokenizer. A server without
    log-probabilities is a warning here (generation works); the teacher check makes it a blocker."""
    report = backend.probe()
    subject = f"{report['model']} at {report['endpoint']}"
    problems = "; ".join(report["problems"]) or "no detail"
    rows: list[CheckRow] = []
    if report["api_key_set"] is not None:
        env = report["api_key_env"]
        rows.append(
            CheckRow("API key", subject, "ok", f"{env} is set")
            if report["api_key_set"]
            else CheckRow(
                "API key", subject, "blocker", f"{env} (api_key_env) is not set", f"export {env}=<key>"
            )
        )
        if not report["api_key_set"]:
            return rows
    if not report["reachable"]:
        fix = "start the server (the pack's header has the command) or fix base_url"
        return [*rows, CheckRow("endpoint", subject, "blocker", problems, fix)]
    if not report["model_listed"]:
        fix = "set model to a name the server's /v1/models lists (or its --served-model-name)"
        return [*rows, CheckRow("endpoint", subject, "blocker", problems, fix)]
    server = report["server"]
    rows.append(CheckRow("endpoint", subject, "ok", f"reachable ({server}); serves {report['served_model']}"))
    logprobs = report["logprobs"]
    if logprobs == "none":
        rows.append(
            CheckRow(
                "log-probabilities",
                subject,
                "warn",
                f"{server} server: no next-token log-probabilities (generation works; a "
                "teacher cannot score here)",
                "serve a teacher with vLLM >= 0.28 (docs/remote.md)",
            )
        )
    else:
        how = "of the verdict tokens by id" if logprobs == "named" else f"top {backend.top_logprobs} only"
        rows.append(CheckRow("log-probabilities", subject, "ok", how))
    state = report["tokenizer"]
    if state in ("missing", "differs"):
        fix = "set tokenizer to a local copy of the served model's tokenizer (docs/remote.md)"
        rows.append(CheckRow("tokenizer", subject, "blocker", f"{state}: {problems}", fix))
    else:
        detail = (
            "renders as the server does" if state == "matches" else "loads here (the server cannot compare)"
        )
        rows.append(CheckRow("tokenizer", subject, "ok", detail))
    return rows
