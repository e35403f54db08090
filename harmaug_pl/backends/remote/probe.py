"""The endpoint probe: cheap facts about a served model, as plain data that a preflight turns into rows.

The probe never raises: a failed step becomes a value (``reachable: False``, ``tokenizer: "missing"``)
plus a one-line entry in ``problems``; what that means for a run is the caller's to judge.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Protocol, TypedDict

from harmaug_pl.backends.remote.http_client import NotServedError, RemoteError, RetryingHttpClient
from harmaug_pl.backends.remote.server_features import ServerFeatures
from harmaug_pl.errors import ConfigError, HarmAugError, ModelLoadError

Logprobs = Literal["named", "top_k", "none"]
TokenizerState = Literal["matches", "differs", "missing", "unchecked"]


class Probed(Protocol):
    """What the probe asks of a backend (:class:`OpenAICompatibleBackend`, which imports this module)."""

    http: RetryingHttpClient
    features: ServerFeatures
    server: str
    model: str
    top_logprobs: int | None

    @property
    def tokenizer(self) -> Any: ...

    def served_model(self) -> str: ...

    def check_tokenizer(self) -> bool: ...


class EndpointProbe(TypedDict):
    """What :func:`probe_endpoint` found; ``None`` where the probe stopped before asking."""

    endpoint: str  # the API root (base_url)
    server: str  # the ``server`` setting: vllm, transformers, openai
    model: str  # the model name requests carry
    api_key_env: str | None
    api_key_set: bool | None  # None: no key configured
    reachable: bool | None  # None: not asked (no key)
    model_listed: bool | None  # /models lists ``model``
    served_model: str | None  # what the server really serves (vLLM's ``root``)
    logprobs: Logprobs | None  # named: by token id; top_k: the top k only; none: not returned
    tokenizer: TokenizerState | None  # the local tokenizer against the server's reading of a chat
    problems: list[str]  # one line per problem met


def probe_endpoint(backend: Probed, timeout: float = 10.0) -> EndpointProbe:
    """API key variable set, server reachable, model listed and what it really serves,
    log-probabilities, and whether the local tokenizer loads and reads a probe chat as the server does
    (``unchecked`` where the server cannot tell).

    Sends ``GET /models``, at most one 1-token completion and (vLLM) one ``/tokenize``, each tried
    once with ``timeout``.
    """
    http = backend.http
    env = http.api_key_env
    report: EndpointProbe = {
        "endpoint": http.base_url,
        "server": backend.server,
        "model": backend.model,
        "api_key_env": env,
        "api_key_set": None if env is None else bool(os.environ.get(env)),
        "reachable": None,
        "model_listed": None,
        "served_model": None,
        "logprobs": None,
        "tokenizer": None,
        "problems": [],
    }
    if report["api_key_set"] is False:
        report["problems"].append(f"environment variable {env} (api_key_env) is not set")
        return report
    with http.single_try(timeout):
        try:
            report["served_model"] = backend.served_model()
            report["reachable"] = report["model_listed"] = True
            report["logprobs"] = _probe_logprobs(backend)
            report["tokenizer"] = _probe_tokenizer(backend, report["problems"])
        except NotServedError as err:
            report.update(reachable=True, model_listed=False)
            report["problems"].append(str(err))
        except RemoteError as err:
            report["reachable"] = bool(report["reachable"])
            report["problems"].append(str(err))
        except HarmAugError as err:  # the server answered, but refused (key, URL) or is not what server says
            report["reachable"] = True
            report["problems"].append(str(err))
        except Exception as err:  # a probe reports, it does not crash the check
            report["problems"].append(f"{http.where('')}: unexpected {type(err).__name__}: {err}")
    return report


def _probe_tokenizer(backend: Probed, problems: list[str]) -> TokenizerState:
    try:
        if not backend.features.token_prompts:
            backend.tokenizer  # noqa: B018 - loads here or says why not
            return "unchecked"
        if not backend.check_tokenizer():
            return "unchecked"
    except ModelLoadError as err:
        problems.append(str(err))
        return "missing"
    except ConfigError as err:
        problems.append(str(err))
        return "differs"
    return "matches"


def _probe_logprobs(backend: Probed) -> Logprobs:
    """``named``, ``top_k`` or ``none``: what a 1-token request on token id 0 gets back."""
    features = backend.features
    if not (features.named_logprobs or (features.top_logprobs and backend.top_logprobs)):
        return "none"
    body: dict[str, Any] = {"model": backend.model, "max_tokens": 1, "temperature": 0.0, "logprobs": 1}
    if features.token_prompts:
        body["prompt"] = [0]
    else:
        body["prompt"] = "Hello"
    if features.named_logprobs:
        body["logprob_token_ids"] = [0]
    if features.token_id_keys:
        body["return_tokens_as_token_ids"] = True
    answer = backend.http.call("POST", "/completions", body, "the log-probability probe")
    try:
        step = answer["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        return "none"
    if features.named_logprobs and "token_id:0" in step:
        return "named"
    return "top_k" if step else "none"
