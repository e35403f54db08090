"""The package's shape: no import cycle, no layer importing the ones above it, light verbs stay light.

Read from the source with ``ast`` (every import, also those inside functions), so a change that
makes, say, a backend import the preflight fails here rather than in a review.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harmaug_pl"

# module prefix -> prefixes it must never import (the layers above it); from the top: cli, then
# preflight (it checks what training will build), training, deploy, augment, data/teachers/backends/
# evaluation, and the plumbing modules at the bottom
ABOVE_TRAINING = ("harmaug_pl.training", "harmaug_pl.preflight", "harmaug_pl.cli")
FORBIDDEN = {
    "harmaug_pl.preflight": ("harmaug_pl.cli",),
    "harmaug_pl.training": ("harmaug_pl.preflight", "harmaug_pl.cli"),
    "harmaug_pl.deploy": ABOVE_TRAINING,
    "harmaug_pl.augment": (*ABOVE_TRAINING, "harmaug_pl.deploy", "harmaug_pl.evaluation"),
    "harmaug_pl.evaluation": (*ABOVE_TRAINING, "harmaug_pl.deploy", "harmaug_pl.augment"),
    "harmaug_pl.teachers": (*ABOVE_TRAINING, "harmaug_pl.deploy", "harmaug_pl.augment", "harmaug_pl.data"),
    "harmaug_pl.backends": (
        *ABOVE_TRAINING,
        "harmaug_pl.deploy",
        "harmaug_pl.augment",
        "harmaug_pl.data",
        "harmaug_pl.teachers",
    ),
    "harmaug_pl.data": (
        *ABOVE_TRAINING,
        "harmaug_pl.deploy",
        "harmaug_pl.augment",
        "harmaug_pl.evaluation",
        "harmaug_pl.teachers",
        "harmaug_pl.backends",
    ),
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package counts as its
    submodule when one of that name exists)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harmaug_pl"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("harmaug_pl"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_packages_import_each_other_without_a_cycle() -> None:
    """Also folder by folder (data/ <-> augment/ would be a cycle even with no module-level one)."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        top = ".".join(module.split(".")[:2])
        packages.setdefault(top, set()).update(".".join(t.split(".")[:2]) for t in targets)
    assert find_cycle({name: targets - {name} for name, targets in packages.items()}) is None


def test_no_layer_imports_the_layers_above_it() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for prefix, above in FORBIDDEN.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in targets
        if target.startswith(above)
    ]
    assert not wrong


def test_only_the_cli_imports_the_cli() -> None:
    callers = [
        module
        for module, targets in import_graph().items()
        if not module.startswith("harmaug_pl.cli") and module != "harmaug_pl.__main__"
        if any(t == "harmaug_pl.cli" or t.startswith("harmaug_pl.cli.") for t in targets)
    ]
    assert not callers


@pytest.mark.parametrize("verb", ["serve", "check"])
def test_light_verbs_answer_help_without_torch_or_lightning(verb: str) -> None:
    """``harmaug serve --help`` and ``harmaug check --help`` load neither torch nor Lightning (their
    speed is measured in the closing note, not timed here)."""
    code = (
        "import sys\n"
        "from harmaug_pl.cli import run_verb\n"
        f"sys.argv = ['harmaug', {verb!r}, '--help']\n"
        "try:\n    run_verb(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"harmaug {verb}" in out.stdout  # the verb's own help was printed
    assert "HEAVY []" in out.stdout


def test_the_short_class_paths_name_the_documented_classes() -> None:
    import harmaug_pl
    from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
    from harmaug_pl.training.distillation import DistillationModule

    assert harmaug_pl.DistillationModule is DistillationModule
    assert harmaug_pl.LlamaGuardTeacher is LlamaGuardTeacher
    for name in harmaug_pl.__all__:
        assert getattr(harmaug_pl, name).__name__ == name
    with pytest.raises(AttributeError):
        _ = harmaug_pl.NoSuchThing
