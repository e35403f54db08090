"""LLM stage checks: the backend of a generator, responder or teacher, and the rows a component gives."""

from __future__ import annotations

from typing import Any

from harmaug_pl.backends import OpenAICompatibleBackend, TransformersBackend, VLLMBackend
from harmaug_pl.preflight import CheckRow
from harmaug_pl.preflight.endpoint_checks import endpoint_rows
from harmaug_pl.preflight.memory_checks import MemoryChecks


class StageChecks(MemoryChecks):
    """One LLM backend: its model, chat template and memory; or the rows of one that loads nothing here."""

    def _llm(self, stage: str, backend: Any, setting: str, batch_size: int, new_tokens: int) -> Any:
        """Rows for one LLM backend; returns a local tokenizer-only backend (or ``None``)."""
        if not isinstance(backend, (TransformersBackend, VLLMBackend)):
            self._backend_rows(backend, stage)
            return None
        vllm = isinstance(backend, VLLMBackend)
        source = self._model(backend.model_id, f"{setting}.init_args.model")
        if not source.resolved:
            return None
        if source.gguf_file and vllm and not self._gguf_copy(stage, backend, setting):
            return None
        local = self._tokenizer(source, backend.templates if vllm else backend)
        if vllm:
            self._vllm_memory(stage, backend, source)
        else:
            self._transformers_memory(stage, backend, source, batch_size, new_tokens)
        return local

    def _gguf_copy(self, stage: str, backend: VLLMBackend, setting: str) -> bool:
        """A ``weights`` row for a GGUF model on vLLM: it needs the backend's ``gguf_dir``."""
        gguf_dir = backend.settings["gguf_dir"]
        subject = f"{stage} {backend.model_id}"
        if gguf_dir is None:
            self.add(
                "weights",
                subject,
                "blocker",
                "vLLM takes a model folder or hub id, not a GGUF file",
                f"set {setting}.init_args.gguf_dir (a folder for its safetensors copy, made once), or use "
                f"harmaug_pl.backends.TransformersBackend at {setting}",
            )
            return False
        self.add(
            "weights",
            subject,
            "ok",
            f"GGUF: converted once to safetensors under {gguf_dir} (keyed by the file's content hash; "
            "about a minute the first time)",
        )
        return True

    def _backend_rows(self, backend: Any, role: str) -> list[CheckRow]:
        """Rows for a backend that loads nothing here: a served model's (from its endpoint probe), or
        the rows a backend harmaug-pl does not know gives about itself (also returned)."""
        if isinstance(backend, OpenAICompatibleBackend):
            return self._add_once(endpoint_rows(backend))
        return self._contributed(backend, role)

    def _add_once(self, rows: list[CheckRow]) -> list[CheckRow]:
        """Add ``rows`` but those already there (stages sharing an endpoint: once); returns them all."""
        self.rows.extend(row for row in rows if row not in self.rows)
        return rows

    def _contributed(self, component: Any, role: str) -> list[CheckRow]:
        """Rows that a backend or teacher harmaug-pl does not know gives about itself (also returned)."""
        name = type(component).__name__
        rows_of = getattr(component, "preflight_rows", None)
        if rows_of is None:
            self.add("component", f"{role} {name}", "warn", f"{name} has no preflight_rows(): not checked")
            return []
        try:
            rows = list(rows_of())
        except Exception as err:
            self.add(
                "component",
                f"{role} {name}",
                "blocker",
                f"{name}.preflight_rows() raised {type(err).__name__}: {err}",
            )
            return []
        return self._add_once(rows)
