"""Memory checks: what a model needs (weights, KV cache, activations) against the device it runs on."""

from __future__ import annotations

import os
from typing import Any

from harmaug_pl.backends import TransformersBackend, VLLMBackend
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.environment_checks import vllm_on_cpu
from harmaug_pl.preflight.hub import ModelSource
from harmaug_pl.preflight.model_checks import ModelChecks


class MemoryChecks(ModelChecks):
    """``memory`` rows: estimates from the model's config against the smallest GPU, or the host."""

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
        if vllm_on_cpu(settings):
            self._vllm_cpu_memory(stage, subject, weights, settings)
            return
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

    def _vllm_cpu_memory(self, stage: str, subject: str, weights: float, settings: dict[str, Any]) -> None:
        """vLLM's CPU platform holds weights plus a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (the
        environment wins, as in vLLM), else the backend's ``cpu_kv_cache_gb``, else
        ``gpu_memory_utilization`` of the host's RAM (vLLM's ``CPUWorker``)."""
        host = mem.host_memory()
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if space:
            kv, source = int(space) * mem.GIB, "VLLM_CPU_KVCACHE_SPACE"
        elif settings["cpu_kv_cache_gb"] is not None:
            kv, source = settings["cpu_kv_cache_gb"] * mem.GIB, "cpu_kv_cache_gb"
        else:
            kv, source = settings["gpu_memory_utilization"] * host.total, "gpu_memory_utilization x RAM"
        detail = f"vLLM CPU engine: weights {mem.gb(weights)} + KV cache {mem.gb(kv)} ({source})"
        fix = "set the backend's cpu_kv_cache_gb (1 is plenty for short chats) or free RAM"
        self._compare(stage, subject, weights + kv, detail, fix, on_gpu=False)
