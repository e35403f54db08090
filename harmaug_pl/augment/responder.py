"""HarmAug's responder: a compliant and a refusing answer to each synthetic instruction.

The paper samples both a harmful response and a refusal from "another LLM" so the student sees the
same instruction judged on its response either way. How compliance is elicited is not published;
we prefill the assistant turn (default "Sure, here is" / "I'm sorry, but I can't"), the same
prefix trick as the generator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harmaug_pl.augment.chat_stage import ChatRequest, ChatStage
from harmaug_pl.augment.generator import Instruction
from harmaug_pl.backends.base import ChatBackend, SamplingConfig
from harmaug_pl.errors import ConfigError


@dataclass(frozen=True)
class Response:
    """A kept response to instruction number ``instruction`` (index into the instruction list)."""

    instruction: int
    kind: str
    text: str
    provenance: dict[str, Any]


class Responder(ChatStage):
    """Answers every instruction once per enabled kind: ``compliant`` then ``refusal``.

    Each kind's prefix prefills the assistant turn; ``""`` asks with a plain chat turn instead and
    ``None`` disables that kind. ``system_prompt``, when set, opens every chat.
    """

    stage = "respond"

    def __init__(
        self,
        backend: ChatBackend,
        compliant_prefix: str | None = "Sure, here is",
        refusal_prefix: str | None = "I'm sorry, but I can't",
        system_prompt: str | None = None,
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=1.0, top_p=0.95),
        batch_size: int = 16,
        seed: int = 0,
        sort_window: int = 8,
    ) -> None:
        super().__init__(backend, sampling, batch_size, seed, sort_window)
        candidates = {"compliant": compliant_prefix, "refusal": refusal_prefix}
        self.kinds: dict[str, str] = {
            name: prefix for name, prefix in candidates.items() if prefix is not None
        }
        if not self.kinds:
            raise ConfigError(
                "responder: both compliant_prefix and refusal_prefix are null; set the responder to null "
                "to skip responses"
            )
        self.system_prompt = system_prompt

    def requests(self, instructions: Sequence[Instruction]) -> list[ChatRequest]:
        """One chat per (instruction, kind), instruction-major so an instruction's answers stay together."""
        requests = []
        for index, instruction in enumerate(instructions):
            for kind, prefix in self.kinds.items():
                chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
                chat.append({"role": "user", "content": instruction.text})
                if prefix:
                    chat.append({"role": "assistant", "content": prefix})
                requests.append(self.request(chat, {"instruction": index, "kind": kind}, kind=kind))
        return requests

    def collect(
        self, requests: Sequence[ChatRequest], values: Sequence[dict[str, Any]]
    ) -> tuple[list[Response], dict[str, int]]:
        """Responses as prefix + continuation; an empty continuation is dropped (it says nothing).

        Returns the responses and counts ``responses_<kind>`` / ``responses_empty_<kind>``.
        """
        counts = Counter({f"responses{empty}_{kind}": 0 for kind in self.kinds for empty in ("", "_empty")})
        responses = []
        for request, value in zip(requests, values):
            kind = request.meta["kind"]
            if not value["text"].strip():
                counts[f"responses_empty_{kind}"] += 1
                continue
            counts[f"responses_{kind}"] += 1
            provenance = {"stage": self.stage, "kind": kind, "model": self.identity, "seed": value["seed"]}
            text = (self.kinds[kind] + value["text"]).strip()
            responses.append(Response(request.meta["instruction"], kind, text, provenance))
        return responses, dict(counts)
