"""Teacher checks: its backend or model, and verdict words that are distinct tokens."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from harmaug_pl.backends import TransformersBackend, VLLMBackend
from harmaug_pl.errors import HarmAugError
from harmaug_pl.preflight.context import class_of, init_args, is_a
from harmaug_pl.preflight.stage_checks import StageChecks
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.teachers.sequence_classifier import SequenceClassifierTeacher
from harmaug_pl.teachers.verdict_word import VerdictWordTeacher


class TeacherChecks(StageChecks):
    """Each kind of teacher: on an LLM backend, a served endpoint, a classifier, a function, your own."""

    def _teacher(self, node: dict[str, Any], prefix: str) -> None:
        args = dict(init_args(node))
        if is_a(node, VerdictWordTeacher):
            backend = self._build(args.get("backend"), f"{prefix}.init_args.backend")
            if backend is None:
                return
            if not isinstance(backend, (TransformersBackend, VLLMBackend)):
                teacher = self._make(lambda: class_of(node)(**args | {"backend": backend}), prefix)
                if teacher is not None:
                    self._endpoint_teacher(teacher, prefix)
                return
            local = self._llm(
                "teacher", backend, f"{prefix}.init_args.backend", int(args.get("batch_size", 8)), 1
            )
            if local is None:
                return
            teacher = self._make(lambda: class_of(node)(**args | {"backend": local}), prefix)
            if teacher is not None:
                self._verdict_tokens(teacher, backend.model_id, prefix)
            return
        teacher = self._build(node, prefix)
        if isinstance(teacher, SequenceClassifierTeacher):
            self._model(teacher.model, f"{prefix}.init_args.model")
        elif isinstance(teacher, CallableTeacher):
            top = teacher.function.replace(":", ".").split(".")[0]
            subject = f"teacher {teacher.function}"
            if importlib.util.find_spec(top) is None:
                self.add(
                    "teacher function",
                    subject,
                    "blocker",
                    f"module {top!r} is not installed",
                    f"install the package that provides {top!r}",
                )
            else:
                self.add("teacher function", subject, "ok", f"module {top!r} is installed")
        elif teacher is not None:
            self._contributed(teacher, "teacher")
            if getattr(teacher, "backend", None) is not None:
                self._backend_rows(teacher.backend, "teacher backend")

    def _endpoint_teacher(self, teacher: Any, prefix: str) -> None:
        """A teacher on a backend that checks itself (a remote endpoint): its rows, then what a teacher
        needs on top: log-probabilities from the server and verdict words that are distinct tokens."""
        rows = self._backend_rows(teacher.backend, "teacher")
        for row in rows:
            if row.what == "log-probabilities" and row.status != "ok":
                if row in self.rows:  # the endpoint's "warn" becomes the teacher's blocker: one row
                    self.rows.remove(row)
                self.add(
                    "log-probabilities",
                    row.subject,
                    "blocker",
                    f"the teacher needs them: {row.detail}",
                    row.fix,
                )
        if any(row.what == "tokenizer" and row.status == "ok" for row in rows):
            self._verdict_tokens(teacher, teacher.backend.model_id, prefix)

    def _verdict_tokens(self, teacher: Any, ref: str, prefix: str) -> None:
        """The teacher's own check (distinct first tokens) on its tokenizer; one token each is best."""
        subject = f"teacher {ref}"
        try:
            ids = teacher._verdict_ids()
        except HarmAugError as err:
            self.add(
                "verdict tokens",
                subject,
                "blocker",
                str(err),
                f"set {prefix}.init_args.unsafe_word / safe_word to words whose first tokens differ",
            )
            return
        words = {teacher.unsafe_word: ids[0], teacher.safe_word: ids[1]}
        tokenizer = teacher.backend.tokenizer
        longer = [word for word in words if len(tokenizer.encode(word, add_special_tokens=False)) > 1]
        detail = ", ".join(f"{word!r} -> {token}" for word, token in words.items())
        if longer:
            self.add(
                "verdict tokens",
                subject,
                "warn",
                f"{detail}; {longer} span several tokens and are scored by their first one",
                "pick verdict words that are single tokens for this tokenizer",
            )
        else:
            self.add("verdict tokens", subject, "ok", f"{detail}: single, distinct tokens")
