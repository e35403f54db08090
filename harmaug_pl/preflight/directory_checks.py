"""Directory checks: run directories and the MLflow store writable, and free disk for what is written."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harmaug_pl.preflight import Status
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.context import EVAL_ONLY_COMMANDS, CheckContext, init_args

BYTES_PER_CACHED_ROW = 4096  # a cached row (prompt, response, score, provenance) as JSON, generously
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + two Adam moments


class DirectoryChecks(CheckContext):
    """``writable`` rows per directory, one ``free disk`` row per file system."""

    def _directories(self) -> None:
        """Writable run directories and MLflow store; free disk per file system for what will be written."""
        params = self._student_params if self.command in (None, "fit") else 0  # checkpoints, export
        export = self.config.get("export") or {}
        formats = set(export.get("formats") or [])
        places: list[tuple[str, str, str, float]] = []  # (label, path, setting, bytes written there)
        if self.data.get("data_dir"):
            places.append(
                ("data_dir", str(self.data["data_dir"]), "data.init_args.data_dir", self._data_bytes())
            )
        if self.trainer.get("default_root_dir"):
            places.append(
                ("default_root_dir", str(self.trainer["default_root_dir"]), "trainer.default_root_dir", 0)
            )
        for callback in self.trainer.get("callbacks") or []:
            dirpath = init_args(callback).get("dirpath")
            if dirpath and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                places.append(
                    (
                        "checkpoints",
                        str(dirpath),
                        "the ModelCheckpoint dirpath",
                        2.0 * params * CHECKPOINT_BYTES_PER_PARAM,
                    )
                )
        if export.get("export_dir"):
            per_param = 4 + 4 * bool(formats & {"onnx", "int8"}) + ("int8" in formats)
            places.append(
                ("export_dir", str(export["export_dir"]), "export.export_dir", float(params * per_param))
            )
        places += self._logger_places()
        by_device: dict[int, list[tuple[str, Path, float]]] = {}
        for label, path, setting, need in places:
            ancestor = self._writable(label, path, setting)
            if ancestor is not None:
                by_device.setdefault(ancestor.stat().st_dev, []).append((label, ancestor, need))
        for entries in by_device.values():
            need = sum(entry[2] for entry in entries)
            if need <= 0:
                continue
            free = shutil.disk_usage(entries[0][1]).free
            labels = ", ".join(entry[0] for entry in entries if entry[2] > 0)
            detail = f"{mem.gb(free)} free on {entries[0][1]}; ~{mem.gb(need)} to be written"
            status: Status = "blocker" if free < need else "warn" if free < 1.5 * need else "ok"
            self.add(
                "free disk",
                labels,
                status,
                detail,
                "" if status == "ok" else "free space there or point these directories elsewhere",
            )

    def _data_bytes(self) -> float:
        """The synthetic rows this pack will cache (and snapshot), at a generous 4 KiB each."""
        if self.command in EVAL_ONLY_COMMANDS or not self.data.get("augment", True):
            return 0.0
        generator = init_args(self.data.get("generator"))
        responder = init_args(self.data.get("responder"))
        instructions = self.data.get("num_instructions") or generator.get("num_instructions") or 0
        answers = sum(responder.get(key, "") is not None for key in ("compliant_prefix", "refusal_prefix"))
        return 2.0 * instructions * (1 + (answers if responder else 0)) * BYTES_PER_CACHED_ROW

    def _logger_places(self) -> list[tuple[str, str, str, float]]:
        loggers = self.trainer.get("logger")
        places: list[tuple[str, str, str, float]] = []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not isinstance(logger, dict):
                continue
            args = init_args(logger)
            if not str(logger.get("class_path", "")).endswith("MLFlowLogger"):
                if args.get("save_dir"):
                    places.append(
                        ("logger save_dir", str(args["save_dir"]), "trainer.logger.init_args.save_dir", 0)
                    )
                continue
            uri, setting = str(args.get("tracking_uri") or ""), "trainer.logger.init_args.tracking_uri"
            if uri.startswith("sqlite:///"):
                places.append(("MLflow store", str(Path(uri[len("sqlite:///") :]).parent), setting, 0))
            elif uri.startswith("file:") or (uri and "://" not in uri):
                places.append(("MLflow store", uri.removeprefix("file://").removeprefix("file:"), setting, 0))
            elif uri:
                self.add("writable", f"MLflow store {uri}", "ok", "a tracking server: not probed")
            location = str(args.get("artifact_location") or "")
            if location and "://" not in location:
                places.append(("MLflow artifacts", location, "trainer.logger.init_args.artifact_location", 0))
        return places

    def _writable(self, label: str, path: str, setting: str) -> Path | None:
        """Can this run create ``path`` (a directory) and files in it? Probed with a temporary file."""
        target = Path(path).expanduser()
        ancestor = target
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        subject = f"{label} {path}"
        if not ancestor.is_dir():
            self.add(
                "writable",
                subject,
                "blocker",
                f"{ancestor} is a file, so {target} cannot be a directory",
                f"point {setting} elsewhere",
            )
            return None
        try:
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as err:
            self.add(
                "writable",
                subject,
                "blocker",
                f"cannot create files in {ancestor}: {err.strerror or err}",
                f"point {setting} at a writable directory",
            )
            return None
        self.add("writable", subject, "ok", "exists" if target.exists() else f"will be created in {ancestor}")
        return ancestor
