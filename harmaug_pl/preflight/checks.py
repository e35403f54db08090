"""The preflight rows of one parsed pack: models, tokenizers, data sets, extras, memory, disk.

:class:`Preflight` reads the configuration LightningCLI parsed (plain values, before any class is
built). Only backends and teachers are built, because their constructors load nothing (their
documented contract); the student, which loads when its module is built, is looked at through its
``config.json`` alone. Hub models are read from their HF cache snapshot when it is complete, so
tokenizers and configs load from local files and no loader calls the hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harmaug_pl.backends import OpenAICompatibleBackend, TransformersBackend, VLLMBackend
from harmaug_pl.data.loaders import DataSource
from harmaug_pl.errors import HarmAugError
from harmaug_pl.model_loading import resolve_model, weight_format
from harmaug_pl.preflight import DEFAULT_TIMEOUT_S, Row, Status
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.endpoint_checks import endpoint_rows
from harmaug_pl.preflight.hub import (
    HubLookup,
    ModelSource,
    local_data_file,
    missing_shards,
)
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.teachers.sequence_classifier import SequenceClassifierTeacher
from harmaug_pl.teachers.verdict_word import VerdictWordTeacher

INSTALL = {
    "vllm": "pip install 'harmaug-pl[vllm]' on a CUDA machine (docs/gpu.md)",
    "bitsandbytes": "pip install 'harmaug-pl[quant]'",
    "accelerate": "pip install 'harmaug-pl[quant]'",
    "gguf": "pip install 'harmaug-pl[default-models]'",
    "onnx": "pip install 'harmaug-pl[export]'",
    "onnxruntime": "pip install 'harmaug-pl[export]'",
}
# commands that never build the synthetic set (only eval sets, the teacher and the student)
EVAL_ONLY_COMMANDS = frozenset({"test", "predict"})
BYTES_PER_CACHED_ROW = 4096  # a cached row (prompt, response, score, provenance) as JSON, generously
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + two Adam moments
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


def _is(node: Any, base: type) -> bool:
    """Whether a config node names a subclass of ``base`` (unknown classes: no)."""
    if not (isinstance(node, dict) and "class_path" in node):
        return False
    try:
        cls = class_of(node)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _args(node: Any) -> dict[str, Any]:
    return (node.get("init_args") or {}) if isinstance(node, dict) else {}


def _skipped(row: Row) -> Row:
    """An unreachable eval set under ``unavailable_eval_sets: skip``: the run leaves it out, warned."""
    if row.status != "blocker":
        return row
    detail = f"{row.detail}; the run skips it (data.init_args.unavailable_eval_sets: skip)"
    return Row(row.what, row.subject, "warn", detail, row.fix)


class Preflight:
    """Computes the rows for one configuration (``config`` as a plain dict, without the subcommand).

    ``command`` is the subcommand about to run (``None`` for ``harmaug check``: everything);
    ``quick`` is the automatic part, which skips reading GGUF metadata (seconds per file).
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
        self.rows: list[Row] = []
        self._memo: dict[Any, Any] = {}
        self._gpus: list[mem.Device] | None = None
        self._student_params = 0
        self._roles = self._model_roles()

    # -- plumbing --------------------------------------------------------------------------------
    def add(self, what: str, subject: str, status: Status, detail: str, fix: str = "") -> None:
        self.rows.append(Row(what, subject, status, detail, fix))

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
        return _args(self.config.get("data"))

    def _build(self, node: Any, setting: str) -> Any:
        try:
            return build_component(node)
        except (HarmAugError, TypeError, ValueError, ImportError, AttributeError) as err:
            self.add("settings", setting, "blocker", f"{type(err).__name__}: {err}", f"fix {setting}")
            return None

    def run(self) -> list[Row]:
        """Every row, in the order a run meets them."""
        from harmaug_pl.data.datamodule import HarmAugDataModule

        harmaug_data = _is(self.config.get("data"), HarmAugDataModule)
        try:
            self._cuda()
            self._extras()
            self._student()
            if harmaug_data:
                self._stages()
                self._data_sets()
            else:
                self.add(
                    "data module",
                    str((self.config.get("data") or {}).get("class_path")),
                    "warn",
                    "not a HarmAugDataModule: its models and data sets are not checked",
                )
            self._directories()
        finally:
            for value in self._memo.values():
                if isinstance(value, TransformersBackend):
                    value.close()
        return self.rows

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
            backend = _args(node).get("backend")
            if isinstance(backend, dict):
                yield stage, backend

    def _model_roles(self) -> dict[str, list[str]]:
        """Which roles each model reference plays, so one reference gets one row naming them all."""
        roles: dict[str, list[str]] = {}
        student = _args(self.config.get("model")).get("student")
        named = [("student", student), ("student tokenizer", self.data.get("tokenizer"))]
        for stage, node in self._stage_nodes():
            named.append((stage, _args(_args(node).get("backend")).get("model") or _args(node).get("model")))
        for role, ref in named:
            if isinstance(ref, str) and not (role == "student tokenizer" and ref == student):
                roles.setdefault(ref, [])
                if role not in roles[ref]:
                    roles[ref].append(role)
        return roles

    # -- environment -----------------------------------------------------------------------------
    def _cuda(self) -> None:
        reasons = []
        if str(self.trainer.get("accelerator")) in GPU_ACCELERATORS:
            reasons.append(f"trainer.accelerator={self.trainer['accelerator']}")
        for stage, backend in self._backends():
            if _is(backend, VLLMBackend):
                reasons.append(f"{stage} on vLLM")
            elif str(_args(backend).get("device", "")).startswith("cuda"):
                reasons.append(f"{stage} device={_args(backend)['device']}")
        if not reasons:
            return
        import torch

        subject = ", ".join(reasons)
        if not self.gpus:
            self.add(
                "CUDA",
                subject,
                "blocker",
                f"no CUDA GPU visible (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'})",
                "run on a machine with an NVIDIA GPU and a CUDA build of torch (docs/gpu.md), or use a "
                "CPU pack",
            )
            return
        names = ", ".join(f"{gpu.name} {mem.gb(gpu.total)}" for gpu in self.gpus)
        self.add("CUDA", subject, "ok", f"{len(self.gpus)} GPU(s): {names}")
        devices = str(self.trainer.get("devices"))
        if devices.isdigit() and int(devices) > len(self.gpus):
            self.add(
                "devices",
                f"trainer.devices={devices}",
                "blocker",
                f"{devices} GPUs asked for, {len(self.gpus)} visible",
                f"set --trainer.devices={len(self.gpus)} (or auto)",
            )

    def _extras(self) -> None:
        """Optional packages the pack needs, found without importing them."""
        needs: dict[str, list[str]] = {}
        for stage, backend in self._backends():
            args = _args(backend)
            if _is(backend, VLLMBackend):
                needs.setdefault("vllm", []).append(stage)
            elif args.get("quantization"):
                for package in ("bitsandbytes", "accelerate"):
                    needs.setdefault(package, []).append(f"{stage} quantization")
            if str(args.get("model", "")).endswith(".gguf"):
                for package in ("gguf", "accelerate"):
                    needs.setdefault(package, []).append(f"{stage} GGUF")
        formats = (self.config.get("export") or {}).get("formats") or []
        if self.command in (None, "fit") and {"onnx", "int8"} & set(formats):
            for package in ("onnx", "onnxruntime"):
                needs.setdefault(package, []).append(f"export.formats {formats}")
        for package, users in needs.items():
            subject = f"{package} ({', '.join(users)})"
            if importlib.util.find_spec(package) is None:
                self.add(
                    "extra", subject, "blocker", f"the '{package}' package is not installed", INSTALL[package]
                )
            else:
                self.add("extra", subject, "ok", "installed")

    # -- models ----------------------------------------------------------------------------------
    def _model(self, ref: str, setting: str, weights: bool = True) -> ModelSource:
        """``model`` and ``weights`` rows for ``ref``, once per reference."""
        return self._once(("model", ref), lambda: self._model_rows(ref, setting, weights))

    def _model_rows(self, ref: str, setting: str, weights: bool) -> ModelSource:
        source = self.hub.model(ref, setting)
        subject = self._subject(ref)
        if not source.resolved:
            self.add("model", subject, "blocker", source.problem or "", source.fix or "")
            return source
        where = f"{source.where}: {source.folder}" if source.folder else source.where
        self.add("model", subject, "ok", where)
        if not weights:
            return source
        fmt = weight_format(source.files)
        shards = missing_shards(source.folder, source.files) if source.folder else []
        if fmt is None:
            shown = ", ".join(source.files[:8]) + (" ..." if len(source.files) > 8 else "")
            self.add(
                "weights",
                subject,
                "blocker",
                "no weights the loading policy accepts (safetensors, pytorch_model.bin, .gguf) among: "
                + shown,
                f"point {setting} at a folder written by save_pretrained() (model.safetensors)",
            )
        elif shards:
            self.add(
                "weights",
                subject,
                "blocker",
                f"{fmt}: shards missing: {', '.join(shards[:4])}",
                f"download {ref} again (an interrupted download leaves such a folder)",
            )
        elif fmt == "pytorch_bin":
            self.add(
                "weights",
                subject,
                "ok",
                "pytorch_model.bin only: loaded with torch.load(weights_only=True) (runs no code)",
            )
        else:
            self.add("weights", subject, "ok", f"GGUF file {source.gguf_file}" if fmt == "gguf" else fmt)
        return source

    def _shape(self, source: ModelSource, auto_class: str, trust_remote_code: bool, subject: str) -> Any:
        """The model's shape from its config (no weights), or ``None`` with a warning; once per model."""
        if source.gguf_file and self.quick:
            return None  # reading GGUF metadata costs seconds: left to `harmaug check`
        key = ("shape", source.ref, auto_class, trust_remote_code)
        return self._once(key, lambda: self._read_shape(source, auto_class, trust_remote_code, subject))

    def _read_shape(self, source: ModelSource, auto_class: str, trust_remote_code: bool, subject: str) -> Any:
        try:
            path, gguf_file = resolve_model(source.load_from or source.ref)
            config = mem.load_config(path, gguf_file, trust_remote_code)
            return mem.model_shape(mem.config_json(config), auto_class, trust_remote_code)
        except Exception as err:
            reason = (str(err).splitlines() or [""])[0][:200]
            self.add("memory", subject, "warn", f"not estimated: {type(err).__name__}: {reason}")
            return None

    def _tokenizer(self, source: ModelSource, backend: TransformersBackend) -> Any:
        """The backend's own tokenizer check (it needs a chat template), on the resolved local files."""
        if source.gguf_file and self.quick:
            return None
        key = ("chat template", source.ref, backend.chat_template, backend.trust_remote_code)
        return self._once(key, lambda: self._chat_template_row(source, backend))

    def _chat_template_row(self, source: ModelSource, backend: TransformersBackend) -> Any:
        local = TransformersBackend(
            source.load_from or source.ref,
            trust_remote_code=backend.trust_remote_code,
            chat_template=backend.chat_template,
        )
        subject = self._subject(source.ref)
        try:
            tokenizer = local.tokenizer
        except HarmAugError as err:
            self.add(
                "chat template",
                subject,
                "blocker",
                str(err),
                "use an instruction-tuned model that ships a chat template, or set the backend's "
                "chat_template",
            )
            return None
        origin = "the backend's chat_template" if backend.chat_template else "the tokenizer's chat template"
        self.add("chat template", subject, "ok", f"{origin} ({type(tokenizer).__name__})")
        return local

    # -- the student -----------------------------------------------------------------------------
    def _student(self) -> None:
        model = self.config.get("model") or {}
        args = _args(model)
        student = args.get("student")
        if not isinstance(student, str):
            self.add("student", str(model.get("class_path")), "warn", "no 'student' setting: not checked")
            return
        source = self._model(student, "model.init_args.student")
        tokenizer = self.data.get("tokenizer")
        if isinstance(tokenizer, str) and tokenizer != student:
            self._model(tokenizer, "data.init_args.tokenizer", weights=False)
        subject = f"student {student}"
        shape = source.resolved and self._shape(
            source, "AutoModelForSequenceClassification", bool(args.get("trust_remote_code")), subject
        )
        if not shape:
            return
        self._student_params = shape.params
        max_length = int(self.data.get("max_length", 512))
        limit = shape.absolute_positions
        if limit is None:
            self.add(
                "max length", subject, "ok", f"max_length {max_length}: relative positions, no fixed limit"
            )
        elif max_length > limit:
            self.add(
                "max length",
                subject,
                "blocker",
                f"data max_length {max_length} > the student's {limit} absolute position embeddings",
                f"set data.init_args.max_length <= {limit}, or use a student with relative positions "
                "(DeBERTa-v3)",
            )
        else:
            self.add("max length", subject, "ok", f"max_length {max_length} <= {limit} absolute positions")
        accelerator = str(self.trainer.get("accelerator"))
        on_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and bool(self.gpus))
        batch = int(self.data.get("batch_size", 32))
        weights, activations = mem.student_bytes(
            shape,
            batch,
            max_length,
            str(self.trainer.get("precision")),
            bool(args.get("gradient_checkpointing")),
        )
        detail = (
            f"{shape.params / 1e6:.0f}M params x {mem.STUDENT_BYTES_PER_PARAM} B = {mem.gb(weights)} + "
            f"activations at {batch} x {max_length} tokens ~{mem.gb(activations)}"
        )
        fix = (
            "lower data.init_args.batch_size and raise trainer.accumulate_grad_batches (same rows per step), "
            "or set model.init_args.gradient_checkpointing: true"
        )
        self._compare("student", subject, weights + activations, detail, fix, on_gpu)

    def _compare(self, stage: str, subject: str, need: float, detail: str, fix: str, on_gpu: bool) -> None:
        """A ``memory`` row: ``need`` bytes against the smallest visible GPU, or the host's RAM."""
        what = f"memory: {stage}"
        if on_gpu and not self.gpus:
            self.add(what, subject, "warn", f"~{mem.gb(need)} ({detail}); not compared: no GPU visible")
            return
        device = min(self.gpus, key=lambda gpu: gpu.total) if on_gpu else mem.host_memory()
        line = f"~{mem.gb(need)} of {mem.gb(device.total)} {device.name} ({detail})"
        if need > device.total:
            self.add(what, subject, "blocker", line, fix)
        elif need > 0.9 * device.total or (on_gpu and device.free is not None and need > device.free):
            free = f"; {mem.gb(device.free)} free now" if device.free is not None else ""
            self.add(what, subject, "warn", line + free, fix)
        else:
            self.add(what, subject, "ok", line)

    # -- LLM stages and the teacher --------------------------------------------------------------
    def _stages(self) -> None:
        for stage, node in self._stage_nodes():
            prefix = f"data.init_args.{stage}"
            args = _args(node)
            if stage == "teacher":
                self._teacher(node, prefix)
                continue
            backend = self._build(args.get("backend"), f"{prefix}.init_args.backend")
            if backend is not None:
                new_tokens = int((args.get("sampling") or {}).get("max_new_tokens", 64))
                self._llm(
                    stage, backend, f"{prefix}.init_args.backend", int(args.get("batch_size", 16)), new_tokens
                )

    def _llm(self, stage: str, backend: Any, setting: str, batch_size: int, new_tokens: int) -> Any:
        """Rows for one LLM backend; returns a local tokenizer-only backend (or ``None``)."""
        if not isinstance(backend, (TransformersBackend, VLLMBackend)):
            self._backend_rows(backend, stage)
            return None
        vllm = isinstance(backend, VLLMBackend)
        source = self._model(backend.model_id, f"{setting}.init_args.model")
        if not source.resolved:
            return None
        if source.gguf_file and vllm:
            self.add(
                "weights",
                f"{stage} {backend.model_id}",
                "blocker",
                "vLLM takes a model folder or hub id, not a GGUF file",
                f"use harmaug_pl.backends.TransformersBackend at {setting}",
            )
            return None
        local = self._tokenizer(source, backend.templates if vllm else backend)
        if vllm:
            self._vllm_memory(stage, backend, source)
        else:
            self._transformers_memory(stage, backend, source, batch_size, new_tokens)
        return local

    def _transformers_memory(
        self, stage: str, backend: TransformersBackend, source: ModelSource, batch_size: int, new_tokens: int
    ) -> None:
        subject = f"{stage} {source.ref}"
        shape = self._shape(source, "AutoModelForCausalLM", backend.trust_remote_code, subject)
        if shape is None:
            return
        weights = mem.llm_weight_bytes(shape, backend.dtype, backend.quantization)
        length = backend.max_input_tokens + new_tokens
        kv = (
            (shape.kv_bytes_per_token_per_byte or 0)
            * mem.DTYPE_BYTES.get(backend.dtype, 4)
            * batch_size
            * length
        )
        quantized = " quantized" if backend.quantization else ""
        detail = (
            f"{shape.params / 1e9:.2f}B params {backend.dtype}{quantized}: weights {mem.gb(weights)} + "
            f"KV cache {batch_size} x {length} tokens {mem.gb(kv)}"
        )
        on_gpu = str(backend.device).startswith("cuda") or (backend.device == "auto" and bool(self.gpus))
        fix = (
            f"lower data.init_args.{stage}.init_args.batch_size or the backend's max_input_tokens, or "
            "quantize it (quantization: {load_in_4bit: true})"
        )
        self._compare(stage, subject, weights + kv, detail, fix, on_gpu)

    def _vllm_memory(self, stage: str, backend: VLLMBackend, source: ModelSource) -> None:
        subject = f"{stage} {source.ref}"
        settings = backend.settings
        shape = self._shape(source, "AutoModelForCausalLM", settings["trust_remote_code"], subject)
        if shape is None:
            return
        what = f"memory: {stage}"
        parallel = settings["tensor_parallel_size"]
        weights = mem.llm_weight_bytes(shape, settings["dtype"], None) / parallel
        length = settings["max_model_len"] or 0
        per_token = (shape.kv_bytes_per_token_per_byte or 0) * mem.DTYPE_BYTES.get(settings["dtype"], 2)
        kv = per_token * length / parallel
        if not self.gpus:
            self.add(
                what, subject, "warn", f"weights {mem.gb(weights)} per GPU; not compared: no GPU visible"
            )
            return
        gpu = min(self.gpus, key=lambda device: device.total)
        util = settings["gpu_memory_utilization"]
        share = util * gpu.total
        detail = (
            f"engine share {util} x {mem.gb(gpu.total)} = {mem.gb(share)} per GPU holds weights "
            f"{mem.gb(weights)}"
            + (f" + one {length}-token sequence of KV cache {mem.gb(kv)}" if length else "")
        )
        if weights + kv > share:
            self.add(
                what,
                subject,
                "blocker",
                detail,
                "raise the backend's gpu_memory_utilization or tensor_parallel_size, lower max_model_len, "
                "or use a larger GPU",
            )
        elif gpu.free is not None and share > gpu.free:
            self.add(
                what,
                subject,
                "warn",
                f"{detail}; only {mem.gb(gpu.free)} free now (vLLM will not start with less than its share)",
                "free the GPU (other processes hold memory) or lower gpu_memory_utilization",
            )
        else:
            self.add(what, subject, "ok", detail)

    def _teacher(self, node: dict[str, Any], prefix: str) -> None:
        args = dict(_args(node))
        if _is(node, VerdictWordTeacher):
            backend = self._build(args.get("backend"), f"{prefix}.init_args.backend")
            if backend is None:
                return
            if not isinstance(backend, (TransformersBackend, VLLMBackend)):
                self._endpoint_teacher(class_of(node)(**args | {"backend": backend}), prefix)
                return
            local = self._llm(
                "teacher", backend, f"{prefix}.init_args.backend", int(args.get("batch_size", 8)), 1
            )
            if local is not None:
                self._verdict_tokens(class_of(node)(**{**args, "backend": local}), backend.model_id, prefix)
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

    def _backend_rows(self, backend: Any, role: str) -> list[Row]:
        """Rows for a backend that loads nothing here: a served model's (from its endpoint probe), or
        the rows a backend harmaug-pl does not know gives about itself (also returned)."""
        if isinstance(backend, OpenAICompatibleBackend):
            return self._add_once(endpoint_rows(backend))
        return self._contributed(backend, role)

    def _add_once(self, rows: list[Row]) -> list[Row]:
        """Add ``rows`` but those already there (stages sharing an endpoint: once); returns them all."""
        self.rows.extend(row for row in rows if row not in self.rows)
        return rows

    def _contributed(self, component: Any, role: str) -> list[Row]:
        """Rows that a backend or teacher harmaug-pl does not know gives about itself (also returned)."""
        name = type(component).__name__
        rows_of = getattr(component, "preflight_rows", None)
        if rows_of is None:
            self.add("component", f"{role} {name}", "warn", f"{name} has no preflight_rows(): not checked")
            return []
        try:
            rows = list(rows_of())
        except Exception as err:
            self.add(
                "component",
                f"{role} {name}",
                "blocker",
                f"{name}.preflight_rows() raised {type(err).__name__}: {err}",
            )
            return []
        return self._add_once(rows)

    # -- data sets -------------------------------------------------------------------------------
    def _data_sets(self) -> None:
        sources = []
        if self.command not in EVAL_ONLY_COMMANDS and isinstance(self.data.get("seed_data"), dict):
            sources.append(("seed data", "data.init_args.seed_data", self.data["seed_data"]))
        for name, values in (self.data.get("eval_sets") or {}).items():
            sources.append((f"eval set {name}", f"data.init_args.eval_sets.{name}", values))
        for label, setting, values in sources:
            try:
                source = DataSource(**values)
            except HarmAugError as err:
                self.add("data", label, "blocker", str(err), f"fix {setting}")
                continue
            first = len(self.rows)
            if source.path is not None:
                self._data_files(label, setting, source, [source.path])
            elif source.data_files and "/" not in (source.hf_name or ""):  # a datasets builder on local files
                self._data_files(label, setting, source, list(source.data_files))
            else:
                state = self.hub.dataset(source.hf_name or "", source.hf_config, source.split, setting)
                self.add("data", label, state.status, state.detail, state.fix)  # type: ignore[arg-type]
            if label.startswith("eval set") and self.data.get("unavailable_eval_sets") == "skip":
                self.rows[first:] = [_skipped(row) for row in self.rows[first:]]

    def _data_files(self, label: str, setting: str, source: DataSource, refs: list[str]) -> None:
        missing = []
        for ref in refs:
            try:
                path = local_data_file(ref)
            except HarmAugError as err:
                missing.append(str(err))
                continue
            if not path.is_file():
                missing.append(f"{ref} (looked at {path.resolve()})")
        if not missing:
            self.add("data", label, "ok", f"local file: {', '.join(refs)}")
            return
        fix = f"create the file or set {setting}.path to an existing one"
        if source.preset:
            from harmaug_pl.evaluation.presets import load_preset

            preset = load_preset(source.preset)
            if "hf_name" not in preset.source:
                fix = (
                    f"preset {source.preset!r} has no hub copy: build the file as docs/evaluation.md shows "
                    f"({preset.description}), or set {setting}.path to your copy"
                )
            else:
                hub = preset.source["hf_name"]
                fix = f"set {setting}.path to an existing copy, or remove path: to read {hub}"
        self.add("data", label, "blocker", f"file not found: {'; '.join(missing)}", fix)

    # -- directories and disk --------------------------------------------------------------------
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
            dirpath = _args(callback).get("dirpath")
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
        generator = _args(self.data.get("generator"))
        responder = _args(self.data.get("responder"))
        instructions = self.data.get("num_instructions") or generator.get("num_instructions") or 0
        answers = sum(responder.get(key, "") is not None for key in ("compliant_prefix", "refusal_prefix"))
        return 2.0 * instructions * (1 + (answers if responder else 0)) * BYTES_PER_CACHED_ROW

    def _logger_places(self) -> list[tuple[str, str, str, float]]:
        loggers = self.trainer.get("logger")
        places: list[tuple[str, str, str, float]] = []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not isinstance(logger, dict):
                continue
            args = _args(logger)
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
