"""Environment checks: a CUDA GPU where the pack asks for one, and the optional packages it needs."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from harmaug_pl.backends import VLLMBackend
from harmaug_pl.backends.vllm_backend import INSTALL_HINT as VLLM_INSTALL
from harmaug_pl.backends.vllm_backend import installed_build
from harmaug_pl.preflight import memory as mem
from harmaug_pl.preflight.context import GPU_ACCELERATORS, CheckContext, init_args, is_a

INSTALL = {
    "vllm": VLLM_INSTALL,
    "bitsandbytes": "pip install 'harmaug-pl[quant]'",
    "accelerate": "pip install 'harmaug-pl[quant]'",
    "gguf": "pip install 'harmaug-pl[default-models]'",
    "onnx": "pip install 'harmaug-pl[export]'",
    "onnxruntime": "pip install 'harmaug-pl[export]'",
}


def vllm_on_cpu(args: dict[str, Any]) -> bool:
    """Whether a VLLMBackend's engine will run on vLLM's CPU platform: ``device: cpu``, or ``auto``
    with vLLM's CPU build installed. ``device: cuda`` (a pack asking for a GPU) never does."""
    device = str(args.get("device", "auto"))
    return device == "cpu" or (device == "auto" and installed_build() == "cpu")


class EnvironmentChecks(CheckContext):
    """CUDA and the extras, found without importing them."""

    def _cuda(self) -> None:
        reasons = []
        if str(self.trainer.get("accelerator")) in GPU_ACCELERATORS:
            reasons.append(f"trainer.accelerator={self.trainer['accelerator']}")
        for stage, backend in self._backends():
            if is_a(backend, VLLMBackend) and not vllm_on_cpu(init_args(backend)):
                reasons.append(f"{stage} on vLLM")
            elif str(init_args(backend).get("device", "")).startswith("cuda"):
                reasons.append(f"{stage} device={init_args(backend)['device']}")
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
            args = init_args(backend)
            if is_a(backend, VLLMBackend):
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
