"""The backend for LLMs a team already serves over an OpenAI-compatible API (vLLM, transformers serve)."""

from harmaug_pl.backends.remote.backend import OpenAICompatibleBackend  # imports httpx2 on first request

__all__ = ["OpenAICompatibleBackend"]
