"""Chats into the token ids a model reads, within a token budget, without ever losing the template.

Every backend (transformers, vLLM, a server fed token ids) renders through :func:`render_ids`, so a
chat becomes the same ids wherever it runs. A rendered chat longer than ``max_input_tokens`` keeps
the chat template's own text whole (BOS, Llama Guard's task and category list, the closing
instruction, the final assistant header, the ``suffix``) and loses part of its messages' *contents*:

- **Which contents**: the user and assistant messages; a system message and a prefilled final
  assistant message (the text a generation continues) are never cut.
- **How much of each, longest first**: tokens come off the longest content until it is as short as
  the next one, then off both, and so on (``truncation="longest_first"`` in tokenizers, here over
  messages). For a teacher row ``[prompt, response]`` the response, usually the long one, is cut
  first and the prompt only once the response is down to the prompt's length; ties go against the
  later message, the response. No message is emptied while another one is longer, so a long
  jailbreak prompt cannot crowd out the response a response-harm verdict is about.
- **Where**: from the middle (head and tail kept, joined by :data:`ELISION`). The start of a
  response is where it complies or refuses and its end where it concludes; the end of a prompt often
  holds the actual ask after a long preamble; a judge prompt built from a template keeps its closing
  instruction; head + tail beat head-only and tail-only for long-text classification (Sun et al.,
  "How to Fine-Tune BERT for Text Classification?", 2019).

Cuts are made on token boundaries of each content (offsets from the tokenizer), then the chat is
rendered and tokenized again and the budget checked on the real ids; a template whose own text does
not fit the budget is a :class:`~harmaug_pl.errors.ConfigError`. A chat within the budget renders
exactly as without this module, so its scores and generations do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from harmaug_pl.backends.base import Chat
from harmaug_pl.errors import ConfigError, DataError

ELISION = " [...] "
TRUNCATION_RULE = "contents, longest first, middle"  # in backends' describe(): cache keys follow the rule


@dataclass(frozen=True)
class RenderOptions:
    """How a chat becomes a prompt.

    ``add_generation_prompt=None`` renders for generation: a final assistant message is a prefill
    to continue (``continue_final_message``), otherwise a generation prompt is added. A bool renders
    as given and continues nothing (scoring). ``suffix`` is appended to the rendered text (Llama
    Guard's ``"\\n\\n"``); ``system_prompt`` is prepended as a system message to chats without one.
    """

    chat_template: str | None = None
    system_prompt: str | None = None
    add_generation_prompt: bool | None = None
    suffix: str = ""


class Rendered(NamedTuple):
    """A chat's token ids (the template's BOS included, nothing added) and whether contents were cut."""

    ids: list[int]
    truncated: bool


def render_ids(tokenizer: Any, chat: Chat, options: RenderOptions, max_input_tokens: int) -> Rendered:
    """The ids the model reads for ``chat``: at most ``max_input_tokens``, template intact.

    ``tokenizer`` is a Hugging Face tokenizer with a chat template (or ``options.chat_template``).
    """
    if max_input_tokens < 1:
        raise ConfigError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
    chat = with_system_prompt(chat, options.system_prompt)
    ids = _encode(tokenizer, render_text(tokenizer, chat, options))
    if len(ids) <= max_input_tokens:
        return Rendered(ids, False)
    prefill = options.add_generation_prompt is None and chat[-1].get("role") == "assistant"
    cuttable = [
        i
        for i, message in enumerate(chat)
        if message.get("role") != "system" and not (prefill and i == len(chat) - 1)
    ]
    offsets = {i: _offsets(tokenizer, chat[i]["content"]) for i in cuttable}
    sizes = [len(offsets[i]) for i in cuttable]
    budget = sum(sizes) - (len(ids) - max_input_tokens)  # content tokens to keep
    while True:  # the budget shrinks by the overshoot each round (the elision and token merges)
        budget = max(budget, 0)
        shares = _longest_first(sizes, budget)
        cut = list(chat)
        for i, share, size in zip(cuttable, shares, sizes):
            if share < size:
                cut[i] = {**chat[i], "content": _keep_middle(chat[i]["content"], offsets[i], share)}
        ids = _encode(tokenizer, render_text(tokenizer, cut, options))
        if len(ids) <= max_input_tokens:
            return Rendered(ids, True)
        if budget == 0:
            raise ConfigError(
                f"max_input_tokens={max_input_tokens} of model {_name(tokenizer)!r} is too small for its "
                f"chat template: with every message emptied the prompt still has {len(ids)} tokens; "
                "raise max_input_tokens"
            )
        budget -= len(ids) - max_input_tokens


def render_text(tokenizer: Any, chat: Chat, options: RenderOptions) -> str:
    """The exact text the model reads (template applied, then ``options.suffix``), nothing cut."""
    from jinja2 import TemplateError

    if not chat:
        raise DataError("a chat needs at least one message; got an empty one")
    chat = with_system_prompt(chat, options.system_prompt)
    prefill = options.add_generation_prompt is None and chat[-1].get("role") == "assistant"
    template_options = {
        "chat_template": options.chat_template,
        "tokenize": False,
        "add_generation_prompt": not prefill
        if options.add_generation_prompt is None
        else options.add_generation_prompt,
        "continue_final_message": prefill,
    }
    try:
        text = tokenizer.apply_chat_template(chat, **template_options)
        if not _shows_every_message(text, chat):
            # Some templates (e.g. Llama-Guard-3-1B) read only typed content parts and silently
            # render plain strings as nothing: retry with typed parts.
            text = tokenizer.apply_chat_template(_typed_content(chat), **template_options)
    except (TemplateError, ValueError) as err:
        raise DataError(
            f"the chat template of model {_name(tokenizer)!r} rejected the chat {_preview(chat)}: {err}"
        ) from err
    if not _shows_every_message(text, chat):
        raise ConfigError(
            f"the chat template of model {_name(tokenizer)!r} drops message text from the chat "
            f"{_preview(chat)} (neither plain nor typed content shows up in the rendered prompt); set "
            "the backend's chat_template to one that renders every message"
        )
    return text + options.suffix


def with_system_prompt(chat: Chat, system_prompt: str | None) -> Chat:
    if system_prompt is None or (chat and chat[0].get("role") == "system"):
        return list(chat)
    return [{"role": "system", "content": system_prompt}, *chat]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """The template holds BOS already: add no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text`` (tokenized alone, as the cut is measured)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # Python (non-tokenizers) tokenizers give no offsets
        raise ConfigError(
            f"a chat is longer than the backend's max_input_tokens, and cutting it needs a fast "
            f"tokenizer (token offsets), which model {_name(tokenizer)!r} lacks ({err}); raise "
            "max_input_tokens above the longest chat"
        ) from err
    return [tuple(span) for span in encoded["offset_mapping"]]


def _longest_first(sizes: list[int], budget: int) -> list[int]:
    """Tokens each message keeps, ``sum <= budget``: the largest common cap, leftovers to the earliest.

    Giving a leftover token to an earlier message means the later one (the response) is cut more.
    """
    low, high = 0, max(sizes, default=0)
    while low < high:  # the largest cap whose total fits
        cap = (low + high + 1) // 2
        if sum(min(size, cap) for size in sizes) <= budget:
            low = cap
        else:
            high = cap - 1
    shares = [min(size, low) for size in sizes]
    left = budget - sum(shares)
    for i, size in enumerate(sizes):
        if left and size > shares[i]:
            shares[i] += 1
            left -= 1
    return shares


def _keep_middle(text: str, offsets: list[tuple[int, int]], keep: int) -> str:
    """``text`` cut to its first and last tokens, ``keep`` in all, joined by :data:`ELISION`."""
    if keep <= 0:
        return ""
    head = (keep + 1) // 2
    tail = keep - head
    start_of_tail = offsets[len(offsets) - tail][0] if tail else len(text)
    return text[: offsets[head - 1][1]] + ELISION + text[start_of_tail:]


def _shows_every_message(text: str, chat: Chat) -> bool:
    return all(message["content"].strip() in text for message in chat)


def _typed_content(chat: Chat) -> list[dict[str, Any]]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in chat]


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _preview(chat: Chat) -> str:
    """A chat named by the start of its last message (rows have no index once batched)."""
    last = str(chat[-1].get("content", ""))
    return repr(last[:60] + ("..." if len(last) > 60 else ""))
