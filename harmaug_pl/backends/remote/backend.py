"""A :class:`ChatBackend` over HTTP, for LLMs a team already serves (vLLM, transformers serve, ...).

The generator, responder and teacher then run on the serving fleet and only the student trains here:
no vLLM install (and its pins) in the training environment, and the synthetic budget is no longer
tied to the training job's GPUs. Which server supports what, with sources: ``docs/remote.md``.

Every chat is rendered *here*, with the model's tokenizer and chat template, exactly as
:class:`TransformersBackend` renders it: the tokenizer (hub id or local copy) must therefore be
loadable where this backend runs. What is sent (field names from vLLM 0.33's
``vllm/entrypoints/openai/{completion,chat_completion}/protocol.py``):

- generation over the chat API (vLLM): ``add_generation_prompt``/``continue_final_message`` for a
  prefilled assistant turn, and ``return_prompt_text``: the prompt the server built must equal the
  local rendering, else a one-line error (a prefix attack that quietly lost its prefill, or a server
  template that differs from the one in the cache key, is a wrong result, not a warning).
- generation over the completions API (every server; the only way on servers that cannot continue a
  chat turn): the locally rendered prompt, as token ids where the server takes them (vLLM: nothing
  is re-tokenized), else as text without a BOS the server adds itself, checked against the prompt
  token count the server reports.
- teacher scores: ``/completions`` with the prompt as token ids (the template plus e.g. Llama
  Guard's ``"\\n\\n"``, no second BOS), ``max_tokens=1``, ``temperature=0``, and ``logprob_token_ids``
  = the verdict tokens with ``return_tokens_as_token_ids`` (vLLM >= 0.28), so neither token can fall
  outside the answer; or, with ``top_logprobs=k``, the top k only, failing with the row named when a
  verdict token is not among them. Servers that cannot return log-probabilities are refused at once.

Cache identity (:meth:`OpenAICompatibleBackend.describe`): what the server really serves (vLLM's
``/models`` ``root``, not a ``--served-model-name`` alias), a hash of the tokenizer and of the chat
template, and the settings that change outputs; never the URL or the key, so moving the same model
to another host keeps the cache. Describing asks the server once (``/models``), so a fully cached run
still needs it reachable.

The parts: which server does what (:mod:`.server_features`), the retrying HTTP client and its errors
(:mod:`.http_client`), the endpoint probe a preflight reads (:mod:`.probe`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch

from harmaug_pl.backends.base import Chat, SamplingConfig
from harmaug_pl.backends.remote.http_client import (
    NoSuchEndpointError,
    NotServedError,
    RemoteError,
    RetryingHttpClient,
    one_line,
)
from harmaug_pl.backends.remote.probe import EndpointProbe, probe_endpoint
from harmaug_pl.backends.remote.server_features import SERVERS
from harmaug_pl.backends.rendering import with_system_prompt
from harmaug_pl.backends.transformers_backend import TransformersBackend, _cut_at_stop
from harmaug_pl.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")
GENERATION_APIS = ("auto", "chat", "completions")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Prompt:
    """A chat as the model reads it: the rendered text and its token ids (no special tokens added)."""

    text: str
    ids: list[int]
    truncated: bool = False


def _row(index: int, chat: Chat) -> str:
    return f"row {index} of the batch (last message {one_line(chat[-1].get('content', ''), 60)!r})"


class OpenAICompatibleBackend:
    """Continue chats and score next tokens on a server with an OpenAI-compatible API.

    Args:
        base_url: the API root, e.g. ``http://gpu-node:8000/v1`` (no credentials in it).
        model: the model name requests carry (a vLLM ``--served-model-name`` alias is fine).
        tokenizer: hub id or local directory of the served model's tokenizer and chat template
            (needed here: prompts are rendered and tokenized locally).
        server: ``vllm``, ``transformers`` (``transformers serve``) or ``openai`` (any other
            OpenAI-compatible server: no prefill over chat, text prompts; see docs/remote.md).
        api_key_env: NAME of the environment variable holding the API key (never the key itself).
        timeout: seconds to wait for one answer (connecting: at most 10).
        max_concurrency: requests in flight at once (a thread pool of that size, one connection each).
        max_retries: retries of a request after 408/429/5xx, a dropped connection, a timeout or
            malformed JSON; waits ``retry_backoff * 2**n`` seconds (or the server's ``Retry-After``).
        generation_api: ``auto`` (the chat API where the server's rendering can be checked (vLLM),
            else completions), ``chat`` (a prefilled chat on a server that cannot continue it is
            refused) or ``completions``.
        top_logprobs: score from the top-k log-probabilities (k = this) instead of asking for the
            verdict tokens by id; for servers without ``logprob_token_ids``.
        served_identity: what the server runs that its API does not report (dtype, quantization,
            revision...): goes into cache keys.
        trust_remote_code, max_input_tokens, system_prompt, chat_template: as for
            :class:`TransformersBackend`, which renders and tokenizes here.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: str,
        server: str = "vllm",
        api_key_env: str | None = None,
        timeout: float = 300.0,
        max_concurrency: int = 16,
        max_retries: int = 6,
        retry_backoff: float = 1.0,
        generation_api: str = "auto",
        top_logprobs: int | None = None,
        served_identity: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        max_input_tokens: int = 4096,
        system_prompt: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        _check_base_url(base_url)
        if server not in SERVERS:
            raise ConfigError(f"server must be one of {sorted(SERVERS)}, got {server!r} (see docs/remote.md)")
        if generation_api not in GENERATION_APIS:
            raise ConfigError(
                f"generation_api must be one of {list(GENERATION_APIS)}, got {generation_api!r}"
            )
        if api_key_env is not None and not _ENV_NAME.fullmatch(api_key_env):
            raise ConfigError(
                "api_key_env must be the NAME of an environment variable (letters, digits, '_'), not the key "
                "itself; the value given is not shown here"
            )
        if timeout <= 0 or max_concurrency < 1 or max_retries < 0 or retry_backoff < 0:
            raise ConfigError(
                "timeout must be > 0, max_concurrency >= 1, max_retries >= 0 and retry_backoff >= 0; got "
                f"{timeout}, {max_concurrency}, {max_retries}, {retry_backoff}"
            )
        if top_logprobs is not None and top_logprobs < 1:
            raise ConfigError(f"top_logprobs must be >= 1 (or null), got {top_logprobs}")
        self.features = SERVERS[server]
        self.server = server
        self.model = model
        self.tokenizer_ref = tokenizer
        self.generation_api = generation_api
        self.top_logprobs = top_logprobs
        self.served_identity = dict(served_identity or {})
        self.max_concurrency = max_concurrency
        self.templates = TransformersBackend(
            tokenizer,
            trust_remote_code=trust_remote_code,
            max_input_tokens=max_input_tokens,
            system_prompt=system_prompt,
            chat_template=chat_template,
        )
        self.http = RetryingHttpClient(
            base_url,
            self.features.label,
            model,
            api_key_env,
            timeout,
            max_retries,
            retry_backoff,
            max_concurrency,
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._identity: dict[str, Any] | None = None

    # -- identity ----------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.model

    def describe(self) -> dict[str, Any]:
        """What the server really serves plus everything here that changes outputs (not URL, not key)."""
        if self._identity is None:
            self.tokenizer  # noqa: B018 - the one-line error when it cannot be loaded here
            template = self.templates.describe()
            served = self.served_model()
            if self.features.token_prompts:
                self.check_tokenizer()
            self._identity = {
                "backend": "openai_compatible",
                "server": self.server,
                "served_model": served,
                "served_identity": self.served_identity,
                "tokenizer_sha256": self._tokenizer_sha256(),
                "chat_template_sha256": template["chat_template_sha256"],
                "system_prompt": template["system_prompt"],
                "max_input_tokens": template["max_input_tokens"],
                "truncation": template["truncation"],
                "generation_api": self.generation_api,
            }
        return self._identity

    def served_model(self) -> str:
        """The weights behind ``model``: vLLM's ``/models`` ``root`` (what ``vllm serve`` was given)."""
        if self.server == "transformers":
            # it serves exactly the model a request names: a pinned server refuses any other name
            # (transformers/cli/serving/utils.py, BaseHandler._resolve_model), and its /models lists
            # the hub cache, not the served model
            return self.model
        listing = self.http.call("GET", "/models", None, "the model list")
        entries = [entry for entry in listing.get("data") or [] if isinstance(entry, dict)]
        entry = next((e for e in entries if e.get("id") == self.model), None)
        if entry is None:
            raise NotServedError(
                f"{self.http.where('/models')}: model {self.model!r} is not served there; it serves "
                f"{[e.get('id') for e in entries]}"
            )
        if self.features.reports_root:
            if entry.get("owned_by") != "vllm" or not entry.get("root"):
                raise ConfigError(
                    f"{self.http.where('/models')} does not look like vLLM (model {self.model!r}: owned_by="
                    f"{entry.get('owned_by')!r}, root={entry.get('root')!r}); set server to what runs there"
                )
            return str(entry["root"])
        return str(entry.get("root") or entry["id"])

    def check_tokenizer(self) -> bool:
        """The server must read a probe chat as the local tokenizer and template do (vLLM's ``/tokenize``,
        at the server root): token-id prompts from a different tokenizer would be read as garbage.
        False when the server has no ``/tokenize`` to ask (a gateway in front of vLLM may hide it)."""
        root = self.http.base_url.removesuffix("/v1")
        chat = [{"role": "user", "content": "Is this chat tokenized the same way on both sides?"}]
        body = {
            "model": self.model,
            "messages": with_system_prompt(chat, self.templates.system_prompt),
            "add_generation_prompt": True,
        }
        try:
            answer = self.http.call("POST", f"{root}/tokenize", body, "the tokenizer check")
        except NoSuchEndpointError:
            log.warning(
                "%s: no /tokenize endpoint; the server's tokenizer is not checked", self.http.where("")
            )
            return False
        local = self.prompts([chat], add_generation_prompt=True)[0].ids
        served = answer.get("tokens")
        if served != local:
            raise ConfigError(
                f"{self.http.where(root + '/tokenize')}: the server reads a probe chat as other tokens "
                f"than the local tokenizer {self.tokenizer_ref!r} and chat template do (server "
                f"{one_line(served, 80)}, here {one_line(local, 80)}); set tokenizer (and chat_template) "
                "to the served model's"
            )
        return True

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded here (prompts are rendered and tokenized locally)."""
        try:
            return self.templates.tokenizer
        except ModelLoadError as err:
            raise ModelLoadError(
                f"the {self.features.label} backend of model {self.model!r} renders prompts on this machine "
                f"and needs its tokenizer here (tokenizer: {self.tokenizer_ref!r}): {err}"
            ) from err

    def _tokenizer_sha256(self) -> str:
        """The tokenizer's content, not its path: a local copy elsewhere keeps the cache."""
        tokenizer = self.tokenizer
        content = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": tokenizer.special_tokens_map,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    # -- rendering ---------------------------------------------------------------------------------

    def prompts(
        self, chats: Sequence[Chat], *, add_generation_prompt: bool | None = None, suffix: str = ""
    ) -> list[_Prompt]:
        """Every chat rendered and tokenized here exactly as :class:`TransformersBackend` does.

        Rows over ``max_input_tokens`` lose part of their message contents, the template kept whole
        (:mod:`harmaug_pl.backends.rendering`, the rule every backend follows); :attr:`last_truncated`
        says which. A cut row's text is its ids decoded: the server's chat API would render it uncut.
        """
        rendered = self.templates.encode_chats(
            chats, add_generation_prompt=add_generation_prompt, suffix=suffix
        )
        texts = self.templates.render(chats, add_generation_prompt=add_generation_prompt, suffix=suffix)
        return [
            _Prompt(self.tokenizer.decode(row.ids) if row.truncated else text, row.ids, row.truncated)
            for text, row in zip(texts, rendered)
        ]

    @property
    def last_truncated(self) -> list[bool]:
        """Per chat of the latest generate/next_token_logprobs call: were its contents cut to fit?"""
        return self.templates.last_truncated

    def _payload(self, prompt: _Prompt, row: str) -> list[int] | str:
        """What ``/completions`` gets as ``prompt``: the token ids, or a text the server reads as them.

        Servers that take only text tokenize it *with* special tokens (transformers serve:
        ``tokenizer(prompt)`` in cli/serving/completion.py), adding a BOS that the rendered template
        already holds, so the template's BOS is left out of the text. Called before requests go to
        the thread pool: a fast tokenizer must not be used from several threads at once.
        """
        if self.features.token_prompts:
            return prompt.ids
        tokenizer = self.tokenizer
        candidates = [prompt.text]
        bos = tokenizer.bos_token
        if bos and prompt.text.startswith(bos):
            candidates.append(prompt.text[len(bos) :])
        for text in candidates:
            if tokenizer(text, add_special_tokens=True)["input_ids"] == prompt.ids:
                return text
        raise ConfigError(
            f"{self.features.label} tokenizes text prompts itself (with special tokens) and no text makes it "
            f"read {row} as rendered here; use a server that takes token ids (vLLM)"
        )

    # -- requests ----------------------------------------------------------------------------------

    def _map(self, work: Callable[[int], T], count: int) -> list[T]:
        """``work(i)`` for every i, at most ``max_concurrency`` at once, results in order.

        Once a row fails, rows not yet started are not started: a freed thread would otherwise take
        the next row before the failure is seen here, and a dead server would cost a second whole
        retry budget before the stage fails."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_concurrency, thread_name_prefix="harmaug-http"
            )
        failed = threading.Event()

        def guarded(i: int) -> T:
            if failed.is_set():
                raise concurrent.futures.CancelledError(f"row {i}: an earlier row of the batch failed")
            try:
                return work(i)
            except BaseException:
                failed.set()
                raise

        futures = [self._pool.submit(guarded, i) for i in range(count)]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise

    def _route(self, chat: Chat) -> str:
        """``chat`` or ``completions`` for one chat, refusing at once what the server cannot do."""
        prefill = chat[-1].get("role") == "assistant"
        if self.generation_api == "completions":
            return "completions"
        if self.generation_api == "auto":
            verifiable = self.features.chat_prefill and self.templates.chat_template is None
            return "chat" if verifiable else "completions"
        if prefill and not self.features.chat_prefill:
            raise ConfigError(
                f"{self.features.label} cannot continue a prefilled assistant turn over the chat API (it "
                "always adds a generation prompt; docs/remote.md): set generation_api to auto or completions"
            )
        return "chat"

    def _sampling_fields(self, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        top_p = sampling.top_p if sampling.temperature > 0 else 1.0
        if self.features.generation_config:
            # transformers serve samples only if the model's own generation config says so: send the
            # whole config (cli/serving/utils.py, _build_generation_config) to sample as TransformersBackend
            config = {"do_sample": sampling.temperature > 0, "max_new_tokens": sampling.max_new_tokens}
            if sampling.temperature > 0:
                config.update(temperature=sampling.temperature, top_p=top_p, top_k=0)
            fields: dict[str, Any] = {"generation_config": json.dumps(config), "seed": seed}
        else:
            fields = {"temperature": sampling.temperature, "top_p": top_p, "seed": seed}
        if self.features.model_defaults:  # sample as the other backends do: no top-k, min-p or penalties
            fields.update(
                top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0
            )
        if sampling.stop:
            fields["stop"] = list(sampling.stop)
        return fields

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig, seed: int) -> list[str]:
        """Continue every chat (see :class:`ChatBackend`); each chat gets its own seed from ``seed``."""
        if not chats:
            return []
        chats = [with_system_prompt(chat, self.templates.system_prompt) for chat in chats]
        prompts = self.prompts(chats)
        # a cut row goes over completions: the chat API would render the uncut chat
        routes = ["completions" if p.truncated else self._route(chat) for chat, p in zip(chats, prompts)]
        rows = [_row(i, chat) for i, chat in enumerate(chats)]
        payloads = [
            self._payload(prompt, row) if route == "completions" else None
            for prompt, route, row in zip(prompts, routes, rows)
        ]
        fields = [self._sampling_fields(sampling, (seed * 1_000_003 + i) % 2**31) for i in range(len(chats))]

        def one(i: int) -> str:
            if routes[i] == "chat":
                return self._chat(chats[i], prompts[i], sampling, fields[i], rows[i])
            body = {"model": self.model, "max_tokens": sampling.max_new_tokens, **fields[i]}
            answer = self._completion(payloads[i], len(prompts[i].ids), body, rows[i])
            text = _field(answer, ("choices", 0, "text"), self.http.where("/completions"), rows[i])
            return text if isinstance(text, str) else ""

        return [_cut_at_stop(text, sampling.stop) for text in self._map(one, len(chats))]

    def _chat(
        self, chat: Chat, prompt: _Prompt, sampling: SamplingConfig, fields: dict[str, Any], row: str
    ) -> str:
        prefill = chat[-1]["role"] == "assistant"
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in chat],
            "max_completion_tokens": sampling.max_new_tokens,
            **fields,
        }
        if self.features.chat_prefill:
            body.update(
                add_generation_prompt=not prefill, continue_final_message=prefill, return_prompt_text=True
            )
        answer = self.http.call("POST", "/chat/completions", body, row)
        text = _field(answer, ("choices", 0, "message", "content"), self.http.where("/chat/completions"), row)
        if self.features.chat_prefill:
            seen = answer.get("prompt_text")
            if seen != prompt.text:
                problem = (
                    "did not return the prompt it built (return_prompt_text)"
                    if seen is None
                    else "built another prompt than the local chat template renders "
                    f"({_first_difference(seen, prompt.text)})"
                )
                raise RemoteError(
                    f"{self.http.where('/chat/completions')} {problem} for {row}: the output would not match "
                    "the cache key; set generation_api: completions"
                )
        return text if isinstance(text, str) else ""

    def _completion(
        self, payload: list[int] | str, length: int, body: dict[str, Any], row: str
    ) -> dict[str, Any]:
        """POST /completions; a text prompt's token count, where the server reports it, must be ``length``."""
        answer = self.http.call("POST", "/completions", {**body, "prompt": payload}, row)
        read = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(payload, str) and isinstance(read, int) and read != length:
            raise RemoteError(
                f"{self.http.where('/completions')} read {read} prompt tokens for {row}, not the "
                f"{length} rendered here (a second BOS, or a tokenizer other than the local one)"
            )
        return answer

    # -- scoring -----------------------------------------------------------------------------------

    def _scoring(self) -> str:
        """``named`` (logprob_token_ids) or ``top_k``; a server that can do neither is refused at once."""
        if self.top_logprobs is not None:
            if not self.features.top_logprobs:
                raise ConfigError(
                    f"{self.features.label} does not return log-probabilities (docs/remote.md), so it cannot "
                    "score as a teacher; serve the teacher with vLLM"
                )
            return "top_k"
        if self.features.named_logprobs:
            return "named"
        raise ConfigError(
            f"{self.features.label} cannot return the log-probabilities of named tokens (docs/remote.md), "
            "so it cannot score as a teacher"
            + (
                "; set top_logprobs to score from its top-k instead"
                if self.features.top_logprobs
                else "; serve the teacher with vLLM"
            )
        )

    def next_token_logprobs(
        self,
        chats: Sequence[Chat],
        token_ids: Sequence[int],
        *,
        add_generation_prompt: bool,
        suffix: str = "",
    ) -> torch.Tensor:
        """Full-vocabulary log-probabilities of ``token_ids`` as the next token: float32 ``[N, K]``."""
        if not chats:
            return torch.empty(0, len(token_ids))
        mode = self._scoring()
        wanted = [int(t) for t in token_ids]
        prompts = self.prompts(chats, add_generation_prompt=add_generation_prompt, suffix=suffix)
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if mode == "named":
            body.update(logprobs=len(wanted), logprob_token_ids=wanted)
        else:
            body["logprobs"] = self.top_logprobs
        if self.features.token_id_keys:
            body["return_tokens_as_token_ids"] = True
        keys = self._logprob_keys(wanted)
        rows = [_row(i, chat) for i, chat in enumerate(chats)]
        payloads = [self._payload(prompt, row) for prompt, row in zip(prompts, rows)]

        def one(i: int) -> list[float]:
            row = rows[i]
            answer = self._completion(payloads[i], len(prompts[i].ids), body, row)
            where = self.http.where("/completions")
            step = _field(answer, ("choices", 0, "logprobs", "top_logprobs", 0), where, row)
            if not isinstance(step, dict):
                raise RemoteError(f"{where} returned no top_logprobs for {row}")
            missing = [token for token, key in zip(wanted, keys) if key not in step]
            if missing:
                reason = (
                    "the server ignored logprob_token_ids (vLLM before 0.28 does); set top_logprobs to score "
                    "from its top-k"
                    if mode == "named"
                    else f"they are not among its top {self.top_logprobs}; raise top_logprobs (vLLM allows "
                    "up to its --max-logprobs, 20 by default)"
                )
                raise RemoteError(
                    f"{where}: no log-probability for verdict token id(s) {missing} for {row}: {reason}"
                )
            return [float(step[key]) for key in keys]

        return torch.tensor(self._map(one, len(chats)), dtype=torch.float32)

    def _logprob_keys(self, token_ids: list[int]) -> list[str]:
        """How the answer names each token: ``token_id:<id>``, or its text (ambiguous texts refused)."""
        if self.features.token_id_keys:
            return [f"token_id:{token}" for token in token_ids]
        tokenizer = self.tokenizer
        texts = [tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(t)]) for t in token_ids]
        if len(set(texts)) < len(texts):
            raise ConfigError(
                f"{self.features.label} names log-probabilities by token text, and token ids {token_ids} "
                f"read as {texts}: they cannot be told apart"
            )
        return texts

    def first_token_id(self, word: str) -> int:
        self.tokenizer  # noqa: B018 - the one-line error when it cannot be loaded here
        return self.templates.first_token_id(word)

    # -- probe -------------------------------------------------------------------------------------

    def probe(self, timeout: float = 10.0) -> EndpointProbe:
        """Cheap facts about the endpoint as plain data, for a preflight; never raises
        (:func:`~harmaug_pl.backends.remote.probe.probe_endpoint`)."""
        return probe_endpoint(self, timeout)

    def close(self) -> None:
        """Stop the request threads and close the connections (the server keeps running)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()
        self.templates.close()


def _check_base_url(base_url: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url must be an http(s) URL such as http://host:8000/v1, got {base_url!r}")
    if parts.username or parts.password:
        raise ConfigError(
            "base_url must not hold credentials (they would reach logs and MLflow params): put the key in an "
            "environment variable and name it in api_key_env"
        )


def _field(answer: dict[str, Any], path: Sequence[str | int], where: str, row: str) -> Any:
    """``answer[path...]``, or a one-line error naming the endpoint, the row and the missing part."""
    value: Any = answer
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            shown = ".".join(str(s) for s in path)
            raise RemoteError(
                f"{where} answered without {shown} for {row} "
                f"(the answer: {one_line(json.dumps(answer), 160)})"
            ) from None
    return value


def _first_difference(seen: str, expected: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(seen, expected)) if a != b), min(len(seen), len(expected)))
    return (
        f"first difference at character {at}: server {seen[at : at + 30]!r}, here {expected[at : at + 30]!r}"
    )
