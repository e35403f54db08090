"""One retrying HTTP client per server, and the one-line errors its answers become.

Bounded connections, retries of what a busy or restarting server answers (408/429/5xx, dropped
connections, timeouts, malformed JSON) with exponential backoff, and every other refusal turned into
a one-line error naming the endpoint, the row and the setting to change.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from harmaug_pl.errors import ConfigError, HarmAugError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 60.0


class RemoteError(HarmAugError):
    """The server failed or answered something unusable; the message names the endpoint and the row."""


class NotServedError(ConfigError):
    """The server answers but does not serve the configured model."""


class NoSuchEndpointError(ConfigError):
    """The server answers 404/405 for a path: a wrong base_url, or an endpoint this server lacks."""


def one_line(text: str, limit: int = 300) -> str:
    """A server's text (an error body, a chat message) on one line, whitespace folded, cut to ``limit``."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(response: Any) -> str:
    """The error text of an answer: OpenAI's ``error.message``, FastAPI's ``detail``, or the body."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text or response.reason_phrase, 200)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return one_line(error["message"], 200)
        for value in (error, body.get("detail"), body.get("message")):
            if value:
                return one_line(value if isinstance(value, str) else json.dumps(value), 200)
    return one_line(json.dumps(body), 200)


def _model_not_found(response: Any, model: str) -> bool:
    """vLLM: 404 ``NotFoundError`` with ``param: model``; OpenAI: ``code: model_not_found``."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    if not isinstance(error, dict):
        return False
    message = str(error.get("message", ""))
    return error.get("param") == "model" or error.get("code") == "model_not_found" or model in message


def key_in_clear(base_url: str) -> bool:
    """Whether an API key sent to ``base_url`` crosses a network unencrypted (``http://`` to a host
    that is not this machine's loopback)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be anywhere
        return True


class RetryingHttpClient:
    """One connection pool to one server: bounded connections, retries with backoff, one-line errors."""

    def __init__(
        self,
        base_url: str,
        label: str,
        model: str,
        api_key_env: str | None,
        timeout: float,
        max_retries: int,
        retry_backoff: float,
        connections: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.connections = connections
        self._client: Any = None
        self._lock = threading.Lock()  # request threads must not build two clients
        self._jitter = random.Random()  # never the global RNG: training seeds must not depend on retries

    def where(self, path: str) -> str:
        return f"{self.label} at {path if '://' in path else self.base_url + path}"

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"api_key_env names the environment variable {self.api_key_env}, which is not set (or empty) "
                f"here; export it with the API key of {self.base_url}"
            )
        return key

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
        return self._client

    def _new_client(self) -> Any:
        import httpx2

        key = self.api_key()
        if key and key_in_clear(self.base_url):
            log.warning(
                "%s: the API key in $%s goes over plain http:// to a host that is not this machine, so "
                "anyone on the network path can read it; use https:// (a TLS proxy in front of the "
                "server) or an SSH tunnel to a loopback port",
                self.label,
                self.api_key_env,
            )
        return httpx2.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx2.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            limits=httpx2.Limits(
                max_connections=self.connections, max_keepalive_connections=self.connections
            ),
        )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @contextlib.contextmanager
    def single_try(self, timeout: float) -> Iterator[None]:
        """Within the block: one attempt per request, at most ``timeout`` seconds (a fresh client)."""
        saved = (self.timeout, self.max_retries)
        self.close()
        self.timeout, self.max_retries = min(saved[0], timeout), 0
        try:
            yield
        finally:
            self.close()
            self.timeout, self.max_retries = saved

    def call(self, method: str, path: str, body: dict[str, Any] | None, row: str) -> dict[str, Any]:
        """The JSON object the server answers; retries 408/429/5xx, dropped connections, timeouts and
        malformed JSON with exponential backoff (``Retry-After`` wins); other 4xx fail at once."""
        import httpx2

        attempts = 1 + self.max_retries
        problem = ""
        for attempt in range(attempts):
            wait: float | None = None
            try:
                response = self.client.request(method, path, json=body)
            except httpx2.TimeoutException as err:
                problem = f"no answer within timeout={self.timeout:g}s ({type(err).__name__})"
            except httpx2.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {one_line(err, 160)})"
            else:
                if response.status_code in RETRY_STATUSES:
                    problem = f"HTTP {response.status_code} ({_server_message(response)})"
                    wait = _retry_after(response)
                elif response.status_code >= 400:
                    raise self._refused(response, path, row)
                else:
                    try:
                        answer = response.json()
                    except ValueError:
                        answer = None
                    if isinstance(answer, dict):
                        return answer
                    problem = (
                        f"malformed JSON in an HTTP {response.status_code} answer: {response.text[:80]!r}"
                    )
            if attempt + 1 < attempts:
                delay = wait if wait is not None else self.retry_backoff * 2**attempt
                delay = min(delay, MAX_RETRY_WAIT_S) * (1 + 0.1 * self._jitter.random())
                log.warning(
                    "%s: %s for %s; retry %d of %d in %.1fs",
                    self.where(path),
                    problem,
                    row,
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise RemoteError(
            f"{self.where(path)}: {problem} for {row}, after {attempts} attempt(s); finished batches are "
            "cached, so re-running resumes once the server is back"
        )

    def _refused(self, response: Any, path: str, row: str) -> HarmAugError:
        status, detail = response.status_code, _server_message(response)
        where = self.where(path)
        if status in (401, 403):
            hint = (
                f"check the key in ${self.api_key_env} (api_key_env)"
                if self.api_key_env
                else "it wants an API key: set api_key_env to the name of the environment variable holding it"
            )
            return ConfigError(f"{where} refused the request (HTTP {status}: {detail}); {hint}")
        if status == 404 and _model_not_found(response, self.model):
            return ConfigError(
                f"{where}: the server does not serve model {self.model!r} (HTTP 404: {detail}); set model to "
                "one of the ids its /models lists"
            )
        if status in (404, 405):
            return NoSuchEndpointError(
                f"{where} does not exist (HTTP {status}: {detail}); base_url must be the server's "
                "OpenAI API root, e.g. http://host:8000/v1"
            )
        return RemoteError(f"{where} rejected the request for {row} (HTTP {status}: {detail})")


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
