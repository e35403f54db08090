"""Student checks: its model, max_length against its position embeddings, and its training memory."""

from __future__ import annotations

from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.context import GPU_ACCELERATORS, init_args
from harmaug_pl.preflight.memory_checks import MemoryChecks


class StudentChecks(MemoryChecks):
    """The student is only read through its ``config.json``: it loads when its module is built."""

    def _student(self) -> None:
        model = self.config.get("model") or {}
        args = init_args(model)
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
