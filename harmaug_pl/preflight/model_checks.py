"""Model checks: each model reference resolved, its weights, its shape (no weights) and chat template."""

from __future__ import annotations

from typing import Any

from harmaug_pl.backends import TransformersBackend
from harmaug_pl.errors import HarmAugError
from harmaug_pl.model_loading import resolve_model, weight_format
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.context import CheckContext
from harmaug_pl.preflight.hub import ModelSource, missing_shards


class ModelChecks(CheckContext):
    """One ``model`` (and ``weights``) row per reference, whatever roles it plays."""

    def _model(self, ref: str, setting: str, weights: bool = True) -> ModelSource:
        """``model`` and ``weights`` rows for ``ref``, once per reference."""
        return self._once(("model", ref), lambda: self._model_rows(ref, setting, weights))

    def _model_rows(self, ref: str, setting: str, weights: bool) -> ModelSource:
        source = self.hub.model(ref, setting)
        subject = self._subject(ref)
        if not source.resolved:
            status = "warn" if source.transient else "blocker"
            self.add("model", subject, status, source.problem or "", source.fix or "")
            return source
        where = f"{source.where}: {source.folder}" if source.folder else source.where
        self.add("model", subject, "ok", where)
        if not weights:
            return source
        fmt = weight_format(source.files)
        shards = missing_shards(source.folder, source.files) if source.folder else []
        if fmt is None:
            shown = ", ".join(source.files[:8]) + (" ..." if len(source.files) > 8 else "")
            self.add(
                "weights",
                subject,
                "blocker",
                "no weights the loading policy accepts (safetensors, pytorch_model.bin, .gguf) among: "
                + shown,
                f"point {setting} at a folder written by save_pretrained() (model.safetensors)",
            )
        elif shards:
            self.add(
                "weights",
                subject,
                "blocker",
                f"{fmt}: shards missing: {', '.join(shards[:4])}",
                f"download {ref} again (an interrupted download leaves such a folder)",
            )
        elif fmt == "pytorch_bin":
            self.add(
                "weights",
                subject,
                "ok",
                "pytorch_model.bin only: loaded with torch.load(weights_only=True) (runs no code)",
            )
        else:
            self.add("weights", subject, "ok", f"GGUF file {source.gguf_file}" if fmt == "gguf" else fmt)
        return source

    def _shape(self, source: ModelSource, auto_class: str, trust_remote_code: bool, subject: str) -> Any:
        """The model's shape from its config (no weights), or ``None`` with a warning; once per model."""
        if source.gguf_file and self.quick:
            return None  # reading GGUF metadata costs seconds: left to `harmaug check`
        key = ("shape", source.ref, auto_class, trust_remote_code)
        return self._once(key, lambda: self._read_shape(source, auto_class, trust_remote_code, subject))

    def _read_shape(self, source: ModelSource, auto_class: str, trust_remote_code: bool, subject: str) -> Any:
        try:
            path, gguf_file = resolve_model(source.load_from or source.ref)
            config = mem.load_config(path, gguf_file, trust_remote_code)
            return mem.model_shape(mem.config_json(config), auto_class, trust_remote_code)
        except Exception as err:
            reason = (str(err).splitlines() or [""])[0][:200]
            self.add("memory", subject, "warn", f"not estimated: {type(err).__name__}: {reason}")
            return None

    def _tokenizer(self, source: ModelSource, backend: TransformersBackend) -> Any:
        """The backend's own tokenizer check (it needs a chat template), on the resolved local files."""
        if source.gguf_file and self.quick:
            return None
        key = ("chat template", source.ref, backend.chat_template, backend.trust_remote_code)
        return self._once(key, lambda: self._chat_template_row(source, backend))

    def _chat_template_row(self, source: ModelSource, backend: TransformersBackend) -> Any:
        local = TransformersBackend(
            source.load_from or source.ref,
            trust_remote_code=backend.trust_remote_code,
            chat_template=backend.chat_template,
        )
        subject = self._subject(source.ref)
        try:
            tokenizer = local.tokenizer
        except HarmAugError as err:
            self.add(
                "chat template",
                subject,
                "blocker",
                str(err),
                "use an instruction-tuned model that ships a chat template, or set the backend's "
                "chat_template",
            )
            return None
        origin = "the backend's chat_template" if backend.chat_template else "the tokenizer's chat template"
        self.add("chat template", subject, "ok", f"{origin} ({type(tokenizer).__name__})")
        return local
