"""Exceptions the package raises on purpose: one base class, so callers and the CLI can catch ours
and show a clear message instead of a traceback from deep inside a library."""

from __future__ import annotations

import contextlib
import pickle  # only for its UnpicklingError: nothing here unpickles
import re
import sys
from collections.abc import Iterator


class HarmAugError(Exception):
    """Base class of every error harmaug-pl raises deliberately."""


class DataError(HarmAugError):
    """Input data is missing, unreadable or invalid; the message names the file, line/row and field."""


class DataUnavailable(DataError):
    """A data source cannot be reached at all: its local file is absent, or its hub dataset cannot be
    loaded (offline, gated without access, no such dataset). Not raised for data that is there but
    bad. An eval set in this state can be skipped (``data.init_args.unavailable_eval_sets: skip``)."""


class ConfigError(HarmAugError):
    """A configuration value (pack YAML, CLI flag, constructor argument) is invalid or inconsistent."""


class ModelLoadError(HarmAugError):
    """A model or tokenizer could not be loaded (missing files, offline hub, wrong architecture)."""


def our_error(error: BaseException) -> HarmAugError | None:
    """The HarmAugError behind ``error`` (jsonargparse and Lightning wrap what constructors raise).

    A checkpoint that ``weights_only=True`` refuses (it pickles more than tensors and plain values)
    counts as ours too: refusing it is the safe-loading rule working, not a crash.
    """
    while error is not None:
        if isinstance(error, HarmAugError):
            return error
        if isinstance(error, pickle.UnpicklingError):
            named = re.search(r"GLOBAL (\S+)", str(error))
            return ModelLoadError(
                "refused to load the checkpoint (--ckpt_path): it asks to call or build the Python "
                f"object {named.group(1) if named else '(unnamed)'!r}, which weights_only=True loading "
                "does not allow, so nothing in it was run. Use checkpoints written by harmaug fit"
            )
        error = error.__cause__ or error.__context__
    return None


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error's message (a library's message can be a page long), cut
    to ``limit`` characters with "..."; the error's type name when it says nothing."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line and isinstance(error, BaseException):
        line = type(error).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def one_line_errors(program: str) -> Iterator[None]:
    """Every command's error policy: ours (see :func:`our_error`) print as one line and exit with
    status 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as error:
        ours = our_error(error)
        if ours is None:
            raise
        print(f"{program}: error: {type(ours).__name__}: {ours}", file=sys.stderr)
        raise SystemExit(2) from error
