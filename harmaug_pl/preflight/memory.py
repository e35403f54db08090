"""Memory estimates from ``config.json`` alone (a model built on the meta device holds no weights).

Estimates, not measurements, using the arithmetic the pack headers use: an LLM stage on
transformers needs its weights (parameters x bytes, NF4 ~0.5 B for quantized linear layers) plus
the KV cache of a full batch at its longest; a vLLM engine takes its ``gpu_memory_utilization``
share of each GPU, which must hold the weights and one ``max_model_len`` sequence of KV cache; the
student needs 16 B per parameter (fp32 weights, gradients, two Adam moments) plus activations of
34 x hidden bytes per token and layer in 16-bit (Korthikanti et al. 2022, attention scores not
kept), or two per layer plus one full layer with gradient checkpointing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
QUANTIZED_BYTES = {"load_in_4bit": 0.5, "load_in_8bit": 1.0}
STUDENT_BYTES_PER_PARAM = 16
ACTIVATION_FACTOR = 34  # bytes per token, per hidden unit and layer, in 16-bit (no attention scores)


@dataclass(frozen=True)
class Device:
    """One accelerator (or the host) and its memory in bytes; ``free`` is ``None`` when unknown."""

    name: str
    total: int
    free: int | None = None


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from a model's config: parameters and per-token sizes."""

    params: int
    linear_params: int  # in nn.Linear layers other than the output head (what bitsandbytes quantizes)
    hidden: int | None
    layers: int | None
    kv_bytes_per_token_per_byte: int | None  # layers x KV heads x head dim x 2 (K and V), per dtype byte
    absolute_positions: int | None  # longest input absolute position embeddings allow; None: relative


def gb(n: float) -> str:
    """Bytes for people: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


def visible_gpus() -> list[Device]:
    """The GPUs this process may use, without initialising CUDA here.

    CUDA initialised in the launching process breaks fork-based strategies and would put a context
    on GPU 0 for every rank, so the sizes are read in a short child process unless CUDA is already
    up here.
    """
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    if num_cuda_devices() == 0:
        return []
    if torch.cuda.is_initialized():
        return _gpus_here()
    code = (
        "import json, torch\n"
        "print(json.dumps([[torch.cuda.get_device_name(i), *torch.cuda.mem_get_info(i)[::-1]]"
        " for i in range(torch.cuda.device_count())]))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        return [Device(name, total, free) for name, total, free in json.loads(out.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return _gpus_here()


def _gpus_here() -> list[Device]:
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(Device(torch.cuda.get_device_name(index), total, free))
    return devices


def host_memory() -> Device:
    """The machine's RAM (what CPU stages and a CPU student use)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        free = None
    return Device("host RAM", total, free)


def load_config(load_from: str, gguf_file: str | None, trust_remote_code: bool, **kwargs: Any) -> Any:
    """A model's ``transformers`` config (``config.json``, or a GGUF file's metadata)."""
    from transformers import AutoConfig

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(load_from, trust_remote_code=trust_remote_code, **extra, **kwargs)


@cache
def model_shape(config_json: str, auto_class: str, trust_remote_code: bool) -> ModelShape:
    """Count parameters by building the model on the meta device (no memory, no weights read)."""
    import transformers
    from transformers import AutoConfig

    document = json.loads(config_json)
    config = AutoConfig.for_model(**document) if "auto_map" not in document else None
    if config is None:  # a remote-code architecture: only its own config class knows it
        raise ValueError("custom (remote code) architecture: parameters not counted")
    if auto_class == "AutoModelForSequenceClassification":
        config.num_labels = 2
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    kv = layers * kv_heads * head_dim * 2 if layers and kv_heads and head_dim else None
    return ModelShape(params, linear, hidden, layers, kv, _absolute_positions(model))


def _absolute_positions(model: Any) -> int | None:
    """Inputs longer than this index past absolute position embeddings; ``None`` if there are none.

    Read from the built embeddings, not from ``max_position_embeddings`` (DeBERTa-v3 lists 512 but
    uses relative positions; RoBERTa-style embeddings start counting after the padding index).
    """
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    padding = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (padding + 1 if padding is not None else 0)


def config_json(config: Any) -> str:
    """A config as the JSON key of :func:`model_shape`'s cache."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def llm_weight_bytes(shape: ModelShape, dtype: str, quantization: dict[str, Any] | None) -> float:
    """Weights in memory: parameters x dtype bytes; bitsandbytes layers at their quantized size."""
    full = DTYPE_BYTES.get(dtype, 4)
    quantized = next((QUANTIZED_BYTES[k] for k in QUANTIZED_BYTES if (quantization or {}).get(k)), None)
    if quantized is None:
        return shape.params * full
    return shape.linear_params * quantized + (shape.params - shape.linear_params) * full


def student_bytes(
    shape: ModelShape, batch_size: int, max_length: int, precision: str, checkpointing: bool
) -> tuple[float, float]:
    """(parameters and optimizer state, activations) of one training step at full length."""
    act_bytes = 2 if any(p in str(precision) for p in ("16", "bf16")) else 4
    tokens = batch_size * max_length
    hidden, layers = shape.hidden or 0, shape.layers or 0
    per_layer = ACTIVATION_FACTOR * tokens * hidden * act_bytes / 2
    if checkpointing:
        activations = 2 * tokens * hidden * layers * act_bytes / 2 + per_layer
    else:
        activations = per_layer * layers
    return shape.params * STUDENT_BYTES_PER_PARAM, activations
