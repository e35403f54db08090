"""Text normalisation against evasion, inside the student's tokenizer (training = export = serving).

Installed into a fast tokenizer's own pipeline (``backend_tokenizer.normalizer`` and
``pre_tokenizer``), so it is saved in the guard folder's ``tokenizer.json`` and applied by everything
that loads the folder: :class:`~harmaug_pl.deploy.guard.Guard`, ``harmaug serve``, the MLflow model
and plain ``transformers.pipeline("text-classification", model=folder)``. It adds, before the
tokenizer's own rules:

* Unicode NFKC: fullwidth (``ｂｏｍｂ``) and mathematical (``𝐛𝐨𝐦𝐛``) letters become plain ones;
* format characters removed (zero-width space/joiners, soft hyphen, bidi marks: Unicode ``Cf``) and
  control characters other than tab and newlines;
* after the tokenizer's own pre-tokeniser, any run of more than :data:`MAX_WORD_CHARS` non-space
  characters cut into pieces of that many, so a 100,000-character "word" is many tokens, not one
  unknown token (WordPiece gives ``[UNK]`` to a word over its ``max_input_chars_per_word``, 100).

It does not map homoglyphs across scripts (Cyrillic ``а`` stays Cyrillic) nor undo leetspeak or
removed spaces: ``benchmarks/perturbation.py`` measures each.

A saved folder's ``tokenizer_config.json`` names the generic ``PreTrainedTokenizerFast`` class:
transformers 5 rebuilds a ``BertTokenizer``'s normaliser from its settings on load, which would
silently drop this one. Folders saved without it load and score exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harmaug_pl.errors import ConfigError

MAX_WORD_CHARS = 100  # WordPiece's default max_input_chars_per_word: longer words are one [UNK]
GENERIC_CLASS = "PreTrainedTokenizerFast"
# format characters (zero-width, bidi, soft hyphen) and C0/C1 controls except \t \n \r
_INVISIBLE = r"[\p{Cf}\x{0000}-\x{0008}\x{000B}\x{000C}\x{000E}-\x{001F}\x{007F}-\x{009F}]"
_LONG_WORD = rf"[^\s]{{{MAX_WORD_CHARS}}}"


def _normaliser_rules() -> list[Any]:
    from tokenizers import Regex, normalizers

    return [normalizers.NFKC(), normalizers.Replace(Regex(_INVISIBLE), "")]


def has_normaliser(tokenizer: Any) -> bool:
    """Whether :func:`install_normaliser` is in ``tokenizer`` (as installed, or loaded from a folder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    normaliser = json.loads(backend.to_str()).get("normalizer") or {}
    first = (normaliser.get("normalizers") or [{}])[0] if normaliser.get("type") == "Sequence" else {}
    return first.get("type") == "NFKC"


def install_normaliser(tokenizer: Any) -> Any:
    """Put the evasion rules (module docstring) in front of ``tokenizer``'s own; returns it.

    Installing twice changes nothing. A tokenizer without a Rust backend (a "slow" one) cannot
    carry the rules into its saved files: :class:`ConfigError`.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"text normalisation needs a fast tokenizer; {type(tokenizer).__name__} has no "
            "backend_tokenizer: set data.normalise_text: false or pick a student with a tokenizer.json"
        )
    if has_normaliser(tokenizer):
        return tokenizer
    own = backend.normalizer
    backend.normalizer = normalizers.Sequence(_normaliser_rules() + ([own] if own is not None else []))
    split = pre_tokenizers.Split(Regex(_LONG_WORD), behavior="isolated")
    own_pre = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(([own_pre] if own_pre is not None else []) + [split])
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """``tokenizer.save_pretrained(folder)``, so that a reload keeps the normaliser when it has one."""
    tokenizer.save_pretrained(folder)
    if not has_normaliser(tokenizer):
        return
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = GENERIC_CLASS  # a model-specific class would rebuild its own normaliser
    # the generic class's default outputs lack token_type_ids: a BERT pair would lose its segment B
    config["model_input_names"] = list(tokenizer.model_input_names)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
