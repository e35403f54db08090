"""Where a model or data set named in a pack would come from: a local path, the HF cache, or the hub.

The caches are read with huggingface_hub's and datasets' own layouts (``try_to_load_from_cache``,
``<namespace>___<name>/<config>/<version>/<hash>``); the hub is asked only about what is not
cached, never with ``HF_HUB_OFFLINE=1``, each request bounded by a timeout, and not again once it
was unreachable, so a check costs seconds with or without a network. A failure the loaders retry
(a timeout, a dropped connection, 408/429/5xx) makes a warning, not a blocker: it says nothing about
whether the load will succeed, and one rank's passing blip must not stop a launch (``ranks``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from harmaug_pl.errors import ModelLoadError, first_line
from harmaug_pl.model_loading import resolve_model, weight_format
from harmaug_pl.package_refs import is_package_ref, resolve_package_path
from harmaug_pl.preflight import DEFAULT_TIMEOUT_S

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# The statuses huggingface_hub's downloads retry with back-off (``utils._http``'s defaults), as do
# its network errors below: the load tries again, so the preflight does not stop on them.
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRIED_NOTE = "a failure the load retries (it may pass then)"


def is_transient(err: BaseException) -> bool:
    """Whether a hub request failed in a way huggingface_hub's loaders retry."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return getattr(err.response, "status_code", None) in RETRIED_STATUS
    retried = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
    return isinstance(err, (*retried, TimeoutError, ConnectionError))


def _env_true(*names: str) -> bool:
    return any(os.environ.get(name, "").upper() in TRUE_VALUES for name in names)


def hub_cache_dir() -> Path:
    """The HF hub cache the loaders read (``HF_HUB_CACHE``, else huggingface_hub's default)."""
    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


@dataclass
class ModelSource:
    """What a model reference resolves to, without loading it.

    ``load_from`` is what configs and tokenizers are read from (a local folder, or the hub id when
    only the hub has them); ``files`` are the top-level names the weights would be loaded from.
    """

    ref: str
    where: str
    load_from: str | None = None
    gguf_file: str | None = None
    files: list[str] = field(default_factory=list)
    folder: Path | None = None
    problem: str | None = None
    fix: str | None = None
    transient: bool = False  # the problem is a failure the load retries: a warning, not a blocker

    @property
    def resolved(self) -> bool:
        return self.problem is None


@dataclass
class DataState:
    """Whether a data set is there: status ``ok``/``blocker``, what was found, the fix."""

    status: str
    detail: str
    fix: str = ""


class HubLookup:
    """Cache-first lookups of models and data sets; at most one failed request to the hub per check."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, offline: bool | None = None) -> None:
        self.timeout = timeout
        if offline is None:
            offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        self.unreachable: str | None = "not asked: HF_HUB_OFFLINE=1" if offline else None
        self.transient = False  # whether ``unreachable`` is a failure the loaders retry
        self.requests = 0

    # -- models ----------------------------------------------------------------------------------
    def model(self, ref: str, setting: str) -> ModelSource:
        """Resolve ``ref`` (local path, ``pkg://``, hub id) as the loaders would, listing its files."""
        try:
            path, gguf_file = resolve_model(ref)
        except ModelLoadError as err:
            return ModelSource(ref, "local", problem=str(err), fix=f"set {setting} to an existing path")
        folder = Path(path)
        if folder.exists():
            files = [gguf_file] if gguf_file else sorted(p.name for p in folder.iterdir() if p.is_file())
            where = "package file" if is_package_ref(ref) else "local path"
            return ModelSource(ref, where, load_from=ref, gguf_file=gguf_file, files=files, folder=folder)
        return self._hub_model(ref, setting)

    def _hub_model(self, repo_id: str, setting: str) -> ModelSource:
        from huggingface_hub import try_to_load_from_cache

        cache = hub_cache_dir()
        cached_config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
        snapshot = Path(cached_config).parent if isinstance(cached_config, str) else None
        cached_files = sorted(p.name for p in snapshot.iterdir() if p.is_file()) if snapshot else []
        if (
            snapshot is not None
            and weight_format(cached_files)
            and not missing_shards(snapshot, cached_files)
        ):
            return ModelSource(
                repo_id,
                f"HF cache, snapshot {snapshot.name[:10]}",
                load_from=str(snapshot),
                files=cached_files,
                folder=snapshot,
            )
        remote, problem, fix, transient = self._remote_files(repo_id, "model")
        if remote is not None:
            where = "hub (config cached, weights not yet)" if snapshot else "hub (not cached yet; downloads)"
            return ModelSource(repo_id, where, load_from=str(snapshot) if snapshot else repo_id, files=remote)
        cached_what = "the config but not all weights" if snapshot else "nothing"
        return ModelSource(
            repo_id,
            "hub",
            problem=f"the HF cache ({cache}) holds {cached_what} of it, and {problem}",
            transient=transient,
            fix=fix
            or (
                f"where the hub is reachable run `hf download {repo_id}` (with the same HF_HUB_CACHE, or "
                f"copy the cache here), or set {setting} to a local model folder"
            ),
        )

    # -- data sets -------------------------------------------------------------------------------
    def dataset(self, name: str, config: str | None, split: str, setting: str) -> DataState:
        """A hub data set as ``datasets.load_dataset`` would find it: prepared in its cache, or on the hub."""
        cached = cached_dataset_splits(name, config)
        label = f"{name}" + (f" config {config}" if config else "")
        if cached is not None:
            if split in cached:
                return DataState("ok", f"{label}: split {split!r} in the datasets cache")
            return DataState(
                "blocker",
                f"{label} is in the datasets cache without split {split!r} (cached splits: {sorted(cached)})",
                f"set {setting}.split to one of {sorted(cached)}",
            )
        remote, problem, fix, transient = self._remote_files(name, "dataset")
        if remote is not None:
            return DataState("ok", f"{label}: on the hub (not cached yet; downloads)")
        return DataState(
            "warn" if transient else "blocker",
            f"{label}: not in the datasets cache, and {problem}",
            fix
            or (
                "load it once where the hub is reachable (datasets.load_dataset fills HF_DATASETS_CACHE), "
                f"or export split {split!r} to a local json/jsonl/csv/parquet file and set {setting}.path"
            ),
        )

    # -- the hub ---------------------------------------------------------------------------------
    def _remote_files(self, repo_id: str, repo_type: str) -> tuple[list[str] | None, str, str, bool]:
        """``(file names, "", "", False)`` when the hub serves the repo to us, else ``(None, problem,
        fix, transient)``."""
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        api = HfApi()
        info_of = api.dataset_info if repo_type == "dataset" else api.model_info
        try:
            info = self._request(lambda: info_of(repo_id, timeout=self.timeout))
            if info is None:
                note = f"; {RETRIED_NOTE}" if self.transient else ""
                return None, f"the hub is unreachable ({self.unreachable}){note}", "", self.transient
            files = sorted(sibling.rfilename for sibling in info.siblings or [])
            if info.gated and files:  # the listing is public; downloading needs the licence accepted
                probe = hf_hub_url(repo_id, files[0], repo_type=repo_type)
                self._request(lambda: get_hf_file_metadata(probe, timeout=self.timeout))
            return files, "", "", False
        except GatedRepoError:
            return (
                None,
                "it is gated and this account has not been granted access",
                (f"accept its licence at {url} and log in (`hf auth login`, or set HF_TOKEN)"),
                False,
            )
        except RepositoryNotFoundError:
            return (
                None,
                "the hub has no such repository (or it is private to another account)",
                (f"check the id; for a private repository log in (`hf auth login`) ({url})"),
                False,
            )
        except HfHubHTTPError as err:
            transient = is_transient(err)
            note = f"; {RETRIED_NOTE}" if transient else ""
            return None, f"the hub answered {first_line(err)}{note}", "", transient

    def _request(self, call: Callable[[], Any]) -> Any:
        """One bounded hub request; after a network failure, no further ones (returns ``None``)."""
        from huggingface_hub.errors import HfHubHTTPError

        if self.unreachable is not None:
            return None
        self.requests += 1
        try:
            return call()
        except HfHubHTTPError:
            raise
        except Exception as err:
            self.unreachable = f"{type(err).__name__}: {first_line(err, 160)}"
            self.transient = is_transient(err)
            return None


def missing_shards(folder: Path, files: list[str]) -> list[str]:
    """Shards a sharded checkpoint's index names that are not in ``folder`` (an interrupted download)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in files:
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {})
            except (OSError, ValueError):
                return [index]
            return sorted({shard for shard in weight_map.values() if not (folder / shard).exists()})
    return []


def cached_dataset_splits(name: str, config: str | None) -> set[str] | None:
    """Splits of ``name`` (and ``config``) prepared in the datasets cache, or ``None`` when not cached.

    The layout ``datasets`` reloads offline: ``<cache>/<namespace>___<snake_name>/<config>/<version>/<hash>``.
    """
    from datasets import config as datasets_config
    from datasets.naming import camelcase_to_snakecase

    root = Path(os.environ.get("HF_DATASETS_CACHE") or datasets_config.HF_DATASETS_CACHE).expanduser()
    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    prepared = [path for path in (root / "___".join(parts)).glob(f"{config or '*'}/*/*") if path.is_dir()]
    if not prepared:
        return None
    splits: set[str] = set()
    for path in prepared:
        try:
            info = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        splits.update(info.get("splits") or {})
    return splits


def local_data_file(ref: str) -> Path:
    """The file a data source's ``path`` (or a ``data_files`` entry) points at, resolved like the loader."""
    return resolve_package_path(ref) if is_package_ref(ref) else Path(ref).expanduser()
