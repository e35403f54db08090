"""Teachers: anything that returns P(unsafe) for (prompt, optional response) rows."""

from harmaug_pl.teachers.base import Teacher
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.teachers.judge import JudgeTeacher
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from harmaug_pl.teachers.sequence_classifier import SequenceClassifierTeacher
from harmaug_pl.teachers.verdict_word import VerdictWordTeacher

__all__ = [
    "CallableTeacher",
    "JudgeTeacher",
    "LlamaGuardTeacher",
    "SequenceClassifierTeacher",
    "Teacher",
    "VerdictWordTeacher",
]
