"""Exceptions the package raises on purpose: one base class, so callers and the CLI can catch ours
and show a clear message instead of a traceback from deep inside a library."""


class HarmAugError(Exception):
    """Base class of every error harmaug-pl raises deliberately."""


class DataError(HarmAugError):
    """Input data is missing, unreadable or invalid; the message names the file, line/row and field."""


class ConfigError(HarmAugError):
    """A configuration value (pack YAML, CLI flag, constructor argument) is invalid or inconsistent."""


class ModelLoadError(HarmAugError):
    """A model or tokenizer could not be loaded (missing files, offline hub, wrong architecture)."""
