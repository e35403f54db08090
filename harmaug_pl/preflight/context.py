"""What every preflight check shares: the parsed pack, its rows, and reading its config nodes."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

from harmaug_pl.errors import HarmAugError
from harmaug_pl.preflight import DEFAULT_TIMEOUT_S, CheckRow, Status
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.hub import HubLookup

# commands that never build the synthetic set (only eval sets, the teacher and the student)
EVAL_ONLY_COMMANDS = frozenset({"test", "predict"})
GPU_ACCELERATORS = frozenset({"gpu", "cuda"})


def build_component(node: Any) -> Any:
    """Build a ``{class_path, init_args}`` value as the CLI would, nested ones first."""
    if not (isinstance(node, dict) and "class_path" in node):
        return node
    cls = class_of(node)
    args = {key: build_component(value) for key, value in (node.get("init_args") or {}).items()}
    return cls(**args, **(node.get("dict_kwargs") or {}))


def class_of(node: dict[str, Any]) -> Any:
    module, _, name = node["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def is_a(node: Any, base: type) -> bool:
    """Whether a config node names a subclass of ``base`` (unknown classes: no)."""
    if not (isinstance(node, dict) and "class_path" in node):
        return False
    try:
        cls = class_of(node)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def init_args(node: Any) -> dict[str, Any]:
    """A config node's ``init_args`` (empty when it has none or is not a node)."""
    return (node.get("init_args") or {}) if isinstance(node, dict) else {}


class CheckContext:
    """What every kind of check reads and writes: the parsed pack, the rows so far, shared lookups.

    ``config`` is the configuration LightningCLI parsed, as a plain dict without the subcommand;
    ``command`` the subcommand about to run (``None`` for ``harmaug check``: everything); ``quick``
    the automatic part, which skips reading GGUF metadata (seconds per file).
    """

    def __init__(
        self,
        config: dict[str, Any],
        command: str | None = None,
        quick: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
        offline: bool | None = None,
    ) -> None:
        self.config = config
        self.command = command
        self.quick = quick
        self.hub = HubLookup(timeout=timeout, offline=offline)
        self.rows: list[CheckRow] = []
        self._memo: dict[Any, Any] = {}
        self._gpus: list[mem.Device] | None = None
        self._student_params = 0
        self._roles = self._model_roles()

    # -- plumbing --------------------------------------------------------------------------------
    def add(self, what: str, subject: str, status: Status, detail: str, fix: str = "") -> None:
        self.rows.append(CheckRow(what, subject, status, detail, fix))

    def _once(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is met (its rows once), the same value after."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _subject(self, ref: str) -> str:
        return f"{'+'.join(self._roles.get(ref, ['model']))} {ref}"

    @property
    def gpus(self) -> list[mem.Device]:
        if self._gpus is None:
            self._gpus = mem.visible_gpus()
        return self._gpus

    @property
    def trainer(self) -> dict[str, Any]:
        return self.config.get("trainer") or {}

    @property
    def data(self) -> dict[str, Any]:
        return init_args(self.config.get("data"))

    def _build(self, node: Any, setting: str) -> Any:
        return self._make(lambda: build_component(node), setting)

    def _make(self, factory: Callable[[], Any], setting: str) -> Any:
        """``factory()``, or a blocker row naming ``setting`` (None) when its settings are wrong."""
        try:
            return factory()
        except (HarmAugError, TypeError, ValueError, ImportError, AttributeError) as err:
            self.add("settings", setting, "blocker", f"{type(err).__name__}: {err}", f"fix {setting}")
            return None

    # -- what the pack uses ----------------------------------------------------------------------
    def _stage_nodes(self) -> list[tuple[str, dict[str, Any]]]:
        """(stage, config node) of the generator, responder and teacher this command uses."""
        nodes = []
        if self.command not in EVAL_ONLY_COMMANDS and self.data.get("augment", True):
            nodes += [(stage, self.data.get(stage)) for stage in ("generator", "responder")]
        nodes.append(("teacher", self.data.get("teacher")))
        return [(stage, node) for stage, node in nodes if isinstance(node, dict)]

    def _backends(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for stage, node in self._stage_nodes():
            backend = init_args(node).get("backend")
            if isinstance(backend, dict):
                yield stage, backend

    def _model_roles(self) -> dict[str, list[str]]:
        """Which roles each model reference plays, so one reference gets one row naming them all."""
        roles: dict[str, list[str]] = {}
        student = init_args(self.config.get("model")).get("student")
        named = [("student", student), ("student tokenizer", self.data.get("tokenizer"))]
        for stage, node in self._stage_nodes():
            args = init_args(node)
            named.append((stage, init_args(args.get("backend")).get("model") or args.get("model")))
        for role, ref in named:
            if isinstance(ref, str) and not (role == "student tokenizer" and ref == student):
                roles.setdefault(ref, [])
                if role not in roles[ref]:
                    roles[ref].append(role)
        return roles
