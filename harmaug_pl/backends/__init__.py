"""LLM backends behind one protocol: continue chats, score the next token."""

from harmaug_pl.backends.base import Chat, ChatBackend, SamplingConfig
from harmaug_pl.backends.remote import OpenAICompatibleBackend  # imports httpx2 on first request
from harmaug_pl.backends.transformers_backend import TransformersBackend
from harmaug_pl.backends.vllm_backend import VLLMBackend  # imports vllm only when an engine starts

__all__ = [
    "Chat",
    "ChatBackend",
    "OpenAICompatibleBackend",
    "SamplingConfig",
    "TransformersBackend",
    "VLLMBackend",
]
