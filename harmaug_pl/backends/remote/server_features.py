"""What each kind of OpenAI-compatible server does with the API, as one table (sources: docs/remote.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerFeatures:
    """What one kind of server does with the OpenAI API (sources: docs/remote.md)."""

    label: str
    chat_prefill: bool  # /chat/completions continues a final assistant message (continue_final_message)
    token_prompts: bool  # /completions takes the prompt as token ids (nothing re-tokenized)
    named_logprobs: bool  # /completions returns log-probs of named token ids (logprob_token_ids)
    top_logprobs: bool  # /completions returns the top-k log-probs of the next token (logprobs=k)
    token_id_keys: bool  # ... keyed "token_id:<id>" (return_tokens_as_token_ids), not by token text
    reports_root: bool  # /models names the weights behind an alias (``root``)
    generation_config: bool  # sampling must be sent as a generation_config (transformers serve)
    model_defaults: bool  # unsent sampling fields take the model's generation_config.json values


SERVERS: dict[str, ServerFeatures] = {
    "vllm": ServerFeatures(
        label="vLLM",
        chat_prefill=True,
        token_prompts=True,
        named_logprobs=True,
        top_logprobs=True,
        token_id_keys=True,
        reports_root=True,
        generation_config=False,
        model_defaults=True,  # --generation-config auto (config/model.py, get_diff_sampling_param)
    ),
    "transformers": ServerFeatures(
        label="transformers serve",
        chat_prefill=False,
        token_prompts=False,
        named_logprobs=False,
        top_logprobs=False,
        token_id_keys=False,
        reports_root=False,
        generation_config=True,
        model_defaults=False,
    ),
    "openai": ServerFeatures(
        label="OpenAI-compatible server",
        chat_prefill=False,
        token_prompts=False,
        named_logprobs=False,
        top_logprobs=True,
        token_id_keys=False,
        reports_root=False,
        generation_config=False,
        model_defaults=False,
    ),
}
