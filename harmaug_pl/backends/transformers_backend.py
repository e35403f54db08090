"""A :class:`ChatBackend` on plain ``transformers``: works on CPU, one GPU, and 4/8-bit (bitsandbytes).

Packs build backends when the CLI parses its config, long before they are used, so nothing loads in
the constructor. The generator, responder and an LLM judge often name the same model: backends with
the same (model, dtype, device, quantization, trust_remote_code) share one loaded copy, which the last
of them to :meth:`~TransformersBackend.close` frees.

Chats render through :mod:`harmaug_pl.backends.rendering`: one longer than ``max_input_tokens`` loses
part of its messages' contents, never the template (a warning gives the counts, once per backend), and
:attr:`TransformersBackend.last_truncated` says which chats of the latest call were cut.

With ``prefix_caching``, the tokens every chat of a batch starts with (system prompt, shared
instructions) run through the model once, not once per chat; see :meth:`TransformersBackend.generate`.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from harmaug_pl.backends.base import Chat, SamplingConfig
from harmaug_pl.backends.nucleus import NucleusSampler
from harmaug_pl.backends.rendering import TRUNCATION_RULE, Rendered, RenderOptions, render_ids, render_text
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.model_loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class _Shared:
    """One loaded tokenizer (+ model, once needed) and how many backends use it."""

    tokenizer: Any
    model: Any = None
    users: int = 0


_LOADED: dict[tuple[str, str, str, str, bool], _Shared] = {}

# A shared prefix shorter than this is computed with the rest: one more forward call would cost more
# than the few tokens it saves.
MIN_SHARED_PREFIX_TOKENS = 8


class TransformersBackend:
    """Continue chats and score next tokens with a Hugging Face causal LM (batched, left-padded).

    Args:
        model: hub id, local directory, ``.gguf`` file or ``pkg://<package>/<path>``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (GPU when there is one).
        quantization: ``transformers.BitsAndBytesConfig`` arguments, e.g. ``{"load_in_4bit": true}``.
        trust_remote_code: run Python code shipped with the model (off unless asked; warns).
        max_input_tokens: longer rendered chats are cut to this many tokens, in their messages'
            contents only (see :mod:`harmaug_pl.backends.rendering`).
        system_prompt: prepended as a system message to chats that have none.
        chat_template: Jinja chat template to use instead of (or for models without) the tokenizer's.
        prefix_caching: in :meth:`generate`, compute the tokens all chats of a batch start with once
            and share their KV cache (same tokens and positions; the sums may differ in the last bits).
    """

    #: the draw of :meth:`generate` (in the chat stages' cache keys, see :mod:`harmaug_pl.backends.base`)
    sampler = "harmaug_pl.backends.nucleus.NucleusSampler"

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        device: str = "cpu",
        quantization: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        max_input_tokens: int = 2048,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        prefix_caching: bool = False,
    ) -> None:
        resolve_dtype(dtype)  # fail at config time, not after minutes of loading
        resolve_device(device)
        if max_input_tokens < 1:
            raise ConfigError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
        _check_quantization(quantization)
        self._ref = model
        self.dtype = dtype
        self.device = device
        self.quantization = dict(quantization) if quantization else None
        self.trust_remote_code = trust_remote_code
        self.max_input_tokens = max_input_tokens
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.prefix_caching = prefix_caching
        self._key = (model, dtype, device, json.dumps(self.quantization, sort_keys=True), trust_remote_code)
        self._shared: _Shared | None = None
        self._warned_truncation = False
        self.last_truncated: list[bool] = []  # per chat of the latest generate/next_token_logprobs

    @property
    def model_id(self) -> str:
        """The model reference as configured (goes into cache keys, with :meth:`describe`)."""
        return self._ref

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of everything that changes outputs (loads the tokenizer, not the model)."""
        template = self.chat_template or self.tokenizer.chat_template
        if not isinstance(template, str):
            template = json.dumps(template, sort_keys=True)
        identity = {
            "backend": "transformers",
            "model": self._ref,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "system_prompt": self.system_prompt,
            "max_input_tokens": self.max_input_tokens,
            "truncation": TRUNCATION_RULE,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        }
        if self.prefix_caching:  # only when on, so rows cached without it keep their keys
            identity["prefix_caching"] = True
        return identity

    # -- loading -----------------------------------------------------------------------------------

    def _acquire(self) -> _Shared:
        if self._shared is None:
            shared = _LOADED.get(self._key) or _Shared(tokenizer=self._load_tokenizer())
            if self.chat_template is None and not shared.tokenizer.chat_template:
                raise ModelLoadError(
                    f"model {self._ref!r} has no chat template, so chats cannot be rendered for it: use an "
                    "instruction-tuned model that ships one, or set the backend's chat_template argument"
                )
            _LOADED[self._key] = shared
            shared.users += 1
            self._shared = shared
        return self._shared

    def _load_tokenizer(self) -> Any:
        tokenizer = load_tokenizer(self._ref, trust_remote_code=self.trust_remote_code)
        tokenizer.padding_side = "left"  # new tokens / the scored position are then at index -1
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(f"model {self._ref!r} has neither a pad nor an eos token to pad with")
            log.debug("model %r has no pad token; padding with eos %r", self._ref, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @property
    def tokenizer(self) -> Any:
        """The (shared, left-padding) tokenizer; loads it on first use."""
        return self._acquire().tokenizer

    @property
    def lm(self) -> Any:
        """The (shared) causal LM in eval mode; loads it on first use."""
        shared = self._acquire()
        if shared.model is None:
            log.info("loading model %r (%s on %s)", self._ref, self.dtype, self.device)
            shared.model = load_causal_lm(
                self._ref,
                dtype=self.dtype,
                device=self.device,
                quantization=self.quantization,
                trust_remote_code=self.trust_remote_code,
            )
        return shared.model

    def close(self) -> None:
        """Stop using the model; the last backend sharing it frees its memory."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        _LOADED.pop(self._key, None)
        on_cuda = shared.model is not None and shared.model.device.type == "cuda"
        shared.model = shared.tokenizer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # -- rendering and encoding --------------------------------------------------------------------

    def _options(self, add_generation_prompt: bool | None, suffix: str) -> RenderOptions:
        return RenderOptions(
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
            add_generation_prompt=add_generation_prompt,
            suffix=suffix,
        )

    def render(
        self, chats: Sequence[Chat], *, add_generation_prompt: bool | None = None, suffix: str = ""
    ) -> list[str]:
        """The exact strings the model reads, one per chat, then ``suffix`` (nothing cut).

        ``add_generation_prompt=None`` renders as :meth:`generate` does: a final assistant message is
        continued (prefill), otherwise a generation prompt is added. A bool renders as given, without
        continuing a final message (what :meth:`next_token_logprobs` does).
        """
        options = self._options(add_generation_prompt, suffix)
        return [render_text(self.tokenizer, chat, options) for chat in chats]

    def encode_chats(
        self, chats: Sequence[Chat], *, add_generation_prompt: bool | None = None, suffix: str = ""
    ) -> list[Rendered]:
        """Each chat's ids within ``max_input_tokens`` (as :meth:`render`, contents cut if needed).

        Sets :attr:`last_truncated` and warns once per backend when chats were cut.
        """
        rendered = self._rendered(chats, add_generation_prompt, suffix)
        self.last_truncated = [row.truncated for row in rendered]
        cut = sum(self.last_truncated)
        if cut and not self._warned_truncation:
            self._warned_truncation = True
            log.warning(
                "%d of %d chats for %r exceed max_input_tokens=%d; their message contents were cut in the "
                "middle, the chat template kept whole (warned once per backend; the augmentation "
                "statistics count every cut row)",
                cut,
                len(rendered),
                self._ref,
                self.max_input_tokens,
            )
        return rendered

    def _rendered(
        self, chats: Sequence[Chat], add_generation_prompt: bool | None, suffix: str
    ) -> list[Rendered]:
        options = self._options(add_generation_prompt, suffix)
        return [render_ids(self.tokenizer, chat, options, self.max_input_tokens) for chat in chats]

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded tensors on the model's device (new tokens / the scored position at index -1)."""
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        device = self.lm.device
        return {name: tensor.to(device) for name, tensor in batch.items()}

    def prompt_lengths(self, chats: Sequence[Chat]) -> list[int]:
        """Tokens each chat's prompt has as :meth:`generate` renders it (chat stages sort batches by it)."""
        return [len(row.ids) for row in self._rendered(chats, None, "")]

    def shared_prefix_length(self, ids: list[list[int]]) -> int:
        """How many leading tokens :meth:`generate` computes once for all rows (0: none).

        Every row keeps at least one token of its own, which the generation starts from.
        """
        if not self.prefix_caching or len(ids) < 2:
            return 0
        length = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
        return length if length >= MIN_SHARED_PREFIX_TOKENS else 0

    def _prefilled(self, ids: list[list[int]], prefix: int) -> tuple[dict[str, torch.Tensor], Any]:
        """The rows laid out as [shared prefix][padding][own tokens], and the prefix's KV cache per row.

        The prefix runs once (batch of one) and its cache is repeated for every row. The padding
        between the parts is masked, and ``generate`` derives position ids from the mask, so each row
        sees the tokens at the positions it would see left-padded.
        """
        lm = self.lm
        device = lm.device
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
        cache = lm(input_ids=torch.tensor([ids[0][:prefix]], device=device), use_cache=True, **extra)
        cache = cache.past_key_values
        cache.batch_repeat_interleave(len(ids))
        tails = [row[prefix:] for row in ids]
        width = max(map(len, tails))
        pad = self.tokenizer.pad_token_id
        input_ids = [row[:prefix] + [pad] * (width - len(tail)) + tail for row, tail in zip(ids, tails)]
        mask = [[1] * prefix + [0] * (width - len(tail)) + [1] * len(tail) for tail in tails]
        batch = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)}
        return {name: tensor.to(device) for name, tensor in batch.items()}, cache

    # -- ChatBackend -------------------------------------------------------------------------------

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig, seed: int) -> list[str]:
        """Continue every chat (see :class:`ChatBackend`); text is cut at the first ``sampling.stop``.

        Only temperature and top-p filter tokens (no top-k), as in vLLM's defaults; the draw is
        :class:`~harmaug_pl.backends.nucleus.NucleusSampler`'s. With
        ``prefix_caching``, the tokens all chats start with are computed once (:meth:`_prefilled`).
        """
        if not chats:
            return []
        tokenizer = self.tokenizer
        ids = [row.ids for row in self.encode_chats(chats)]
        prefix = self.shared_prefix_length(ids)
        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }
        # Greedy decoding: with a temperature, NucleusSampler has already drawn the one token left.
        options["do_sample"] = False
        if sampling.temperature > 0:
            options["logits_processor"] = LogitsProcessorList(
                [NucleusSampler(sampling.temperature, sampling.top_p)]
            )
        if sampling.stop:
            options.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
        # Seed a forked RNG: reproducible batches without moving the process-wide random state
        # (training must not depend on whether the rows came from the cache or the model).
        device = self.lm.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            if prefix:
                batch, options["past_key_values"] = self._prefilled(ids, prefix)
            else:
                batch = self._pad(ids)
            torch.manual_seed(seed)
            output = self.lm.generate(**batch, **options)
        prompt_length = batch["input_ids"].shape[1]
        texts = [
            _decode_continuation(tokenizer, row[:prompt_length].tolist(), row[prompt_length:].tolist())
            for row in output
        ]
        return [_cut_at_stop(text, sampling.stop) for text in texts]

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
        lm = self.lm
        rendered = self.encode_chats(chats, add_generation_prompt=add_generation_prompt, suffix=suffix)
        batch = self._pad([row.ids for row in rendered])
        accepted = inspect.signature(lm.forward).parameters
        extra: dict[str, Any] = {}
        if "position_ids" in accepted:  # positions restart at 0 after the left padding
            extra["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in accepted:  # skip the [N, L, vocab] logits we never read
            extra["logits_to_keep"] = 1
        with torch.inference_mode():
            logits = lm(**batch, **extra).logits[:, -1]
        vocab = logits.shape[-1]
        bad = [token for token in token_ids if not 0 <= token < vocab]
        if bad:
            raise ConfigError(
                f"token ids {bad} are outside the vocabulary (size {vocab}) of model {self._ref!r}"
            )
        return logits.float().log_softmax(-1)[:, list(token_ids)].cpu()

    def first_token_id(self, word: str) -> int:
        """First id of ``word`` tokenized without special tokens (as written at the start of a turn)."""
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ConfigError(f"word {word!r} encodes to no tokens with the tokenizer of model {self._ref!r}")
        return int(ids[0])


def _check_quantization(settings: dict[str, Any] | None) -> None:
    """Reject unknown ``BitsAndBytesConfig`` keys at config time.

    ``BitsAndBytesConfig`` silently ignores them, so a typo (``load_in_4bits``) would load the full
    model and run out of memory on the GPU the pack was written for.
    """
    if not settings:
        return
    from transformers import BitsAndBytesConfig

    known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"quantization: unknown BitsAndBytesConfig setting(s) {unknown}; known: {sorted(known)}"
        )


def _decode_continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decode new tokens with the prompt's last tokens as context, then drop that context.

    SentencePiece decoders strip the leading space of a sequence, so decoding the continuation alone
    would glue it to a prefill ("Sure, here is" + "a plan" -> "Sure, here isa plan").
    """
    context = prompt_ids[-3:]
    head = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + new_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    positions = [text.find(stop) for stop in stops if stop]
    hits = [position for position in positions if position >= 0]
    return text[: min(hits)] if hits else text
