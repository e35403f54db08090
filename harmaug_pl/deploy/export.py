"""``harmaug export``: a trained student as a Hugging Face folder, ONNX and int8 ONNX, each verified.

The Hugging Face folder is the unit everything else builds on: safetensors weights, tokenizer,
``id2label``, a model card and ``harmaug_guard.json`` (max length, threshold: what serving must
repeat from training). ``StudentExport`` writes it at the end of fit; this module also rebuilds it
from a Lightning checkpoint (``weights_only=True``), an MLflow run or a model folder, then adds
``model.onnx`` and ``model.int8.onnx`` beside it. Every format is reloaded through
:class:`~harmaug_pl.deploy.guard.Guard` and compared with the PyTorch scores on a sample; the differences
go into ``export_report.json`` and the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from harmaug_pl.categories import CategoryHead, GuardCategories, check_taxonomy
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.data.normalise import has_normaliser, install_normaliser, save_tokenizer
from harmaug_pl.deploy.guard import (
    CATEGORY_OUTPUT,
    GUARD_CONFIG,
    ID2LABEL,
    Guard,
    GuardSettings,
    model_input_names,
    require_onnxruntime,
)
from harmaug_pl.errors import ConfigError, ModelLoadError, one_line_errors
from harmaug_pl.model_loading import (
    build_sequence_classifier,
    load_sequence_classifier,
    load_tokenizer,
    torch_load,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export_report.json"
FORMATS = ("hf", "onnx", "int8")
DEFAULT_SAMPLE = "pkg://harmaug_pl/resources/openai_moderation_eval.json"
ONNX_OPSET = 17


# -- the Hugging Face folder ------------------------------------------------------------------
def model_card(card: dict[str, Any], settings: GuardSettings) -> str:
    """A README.md model card: what the guard is, what it learned from, how it scored."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [harmaug, safety, guard, distillation]",
        "---",
        "",
        "# HarmAug student guard",
        "",
        "A small encoder distilled from a safety guard with HarmAug data augmentation (harmaug-pl). It "
        "returns P(unsafe) for a prompt, or for a (prompt, response) pair encoded as a text pair.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {card.get('student_base', 'unknown')} |",
        f"| teacher | {card.get('teacher', 'not recorded')} |",
        f"| training data | {card.get('data', 'not recorded')} |",
        f"| weights | {card.get('source', 'not recorded')} |",
        f"| max length (tokens) | {settings.max_length} (longer inputs are truncated as in training) |",
        f"| threshold | {settings.threshold} |",
        f"| labels | {ID2LABEL} |",
    ]
    if card.get("categories"):
        lines.append(
            f"| categories | {', '.join(card['categories'])} (harmaug_categories.*: read by harmaug only) |"
        )
    if card.get("note"):
        lines += ["", f"**Note:** {card['note']}"]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    checks = card.get("verification") or {}
    if checks:
        lines += ["", "## Export verification (max |P(unsafe) - PyTorch P(unsafe)| on a sample)", ""]
        lines += ["| format | file | max abs diff | label flips |", "|---|---|---|---|"]
        lines += [
            f"| {fmt} | {c['file']} | {c['max_abs_diff']:.2e} | {c.get('label_flips', 'n/a')} |"
            for fmt, c in checks.items()
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from harmaug_pl.deploy.guard import Guard",
        "guard = Guard.from_pretrained('<this folder>')  # or '<this folder>/model.int8.onnx'",
        "guard.score(['a prompt'], responses=['a response'])",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_guard_folder(
    student: Any,
    tokenizer: Any,
    folder: str | Path,
    settings: GuardSettings,
    card: dict[str, Any],
    categories: GuardCategories | None = None,
) -> Path:
    """Save the student (safetensors), its tokenizer, settings and model card into ``folder``.

    The saved tokenizer's ``model_max_length`` is the training max length, so
    ``pipeline("text-classification", model=folder, truncation=True)`` truncates as in training, and
    it keeps the text normaliser when it has one (:func:`~harmaug_pl.data.normalise.save_tokenizer`).
    ``categories`` go into their own files; without them, category files of an earlier export go.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if categories is not None:
        categories.save(folder)
        card = {**card, "categories": categories.names}
    else:
        GuardCategories.remove(folder)
    student.config.id2label = dict(ID2LABEL)
    student.config.label2id = {v: k for k, v in ID2LABEL.items()}
    student.save_pretrained(folder, safe_serialization=True)
    trained_with = tokenizer.model_max_length
    tokenizer.model_max_length = settings.max_length
    try:
        save_tokenizer(tokenizer, folder)
    finally:
        tokenizer.model_max_length = trained_with  # the tokenizer may be the data module's, still in use
    settings.save(folder)
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(model_card(card, settings))
    return folder


def _update_card(folder: Path, **changes: Any) -> None:
    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
    card.update(changes)
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(model_card(card, GuardSettings.load(folder)))


# -- sources ----------------------------------------------------------------------------------
def from_checkpoint(
    ckpt_path: str, folder: Path, max_length: int | None, normalise_text: bool = True
) -> Guard:
    """Write the guard folder of a Lightning checkpoint's student (``weights_only=True``: no pickle).

    Returns the student in memory as a guard: the reference the saved formats are checked against.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {ckpt_path!r}: no such file")
    if max_length is None:
        raise ConfigError(
            "--max_length is required with --checkpoint (a checkpoint does not record the data "
            "module's max_length): pass the pack's data.init_args.max_length"
        )
    try:
        checkpoint = torch_load(path, map_location="cpu")
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with long messages
        raise ModelLoadError(f"cannot load checkpoint {ckpt_path!r} with weights_only=True: {err}") from err
    hparams = checkpoint.get("hyper_parameters") or {}
    if "student" not in hparams:
        raise ModelLoadError(
            f"checkpoint {ckpt_path!r} has no hyper_parameters.student: not a DistillationModule checkpoint"
        )
    student = build_sequence_classifier(  # the checkpoint sets every weight below
        hparams["student"],
        num_labels=2,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
        trust_remote_code=hparams.get("trust_remote_code", False),
    )
    prefix = "student."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ModelLoadError(
            f"checkpoint {ckpt_path!r} does not match student {hparams['student']!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    categories = checkpoint_categories(checkpoint["state_dict"], hparams, ckpt_path)
    metrics = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("best_model_score") is not None:
            metrics[f"best {state.get('monitor')}"] = float(state["best_model_score"])
    card = {
        "student_base": hparams["student"],
        "source": f"checkpoint {path.name} (epoch {checkpoint.get('epoch')}, "
        f"step {checkpoint.get('global_step')})",
        "metrics": metrics,
    }
    settings = GuardSettings(max_length=max_length, threshold=float(hparams.get("threshold", 0.5)))
    tokenizer = load_tokenizer(hparams["student"], trust_remote_code=hparams.get("trust_remote_code", False))
    if normalise_text:  # as the data module trained it (its normalise_text is not in the checkpoint)
        install_normaliser(tokenizer)
    write_guard_folder(student, tokenizer, folder, settings, card, categories)
    return Guard.from_model(student, tokenizer, settings, categories)


def checkpoint_categories(
    state: dict[str, torch.Tensor], hparams: dict[str, Any], ckpt_path: str
) -> GuardCategories | None:
    """The category head a checkpoint holds (trained with ``category_weight`` > 0), else ``None``."""
    if not hparams.get("category_weight"):
        return None
    prefix = "category_head."
    head_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    weight = head_state.get("linear.weight")
    if weight is None:
        raise ModelLoadError(f"checkpoint {ckpt_path!r}: category_weight > 0 but no category_head weights")
    categories = check_taxonomy(hparams.get("categories") or [], f"checkpoint {ckpt_path} categories")
    head = CategoryHead(weight.shape[1], weight.shape[0])
    head.load_state_dict(head_state)
    fallback = float(hparams.get("threshold", 0.5))
    calibrated = state.get("category_thresholds", torch.full((len(categories),), float("nan"))).tolist()
    thresholds = [fallback if value != value else value for value in calibrated]  # NaN: not calibrated
    return GuardCategories(head.eval(), categories, thresholds)


def from_mlflow_run(run_id: str, tracking_uri: str, folder: Path) -> Guard:
    """Download the guard folder ``StudentExport`` logged to the run (artifact ``guard/``).

    The downloaded folder is its own reference (it is what the run saved).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="guard", dst_path=str(folder.parent), tracking_uri=tracking_uri
        )
    except MlflowException as err:
        raise ModelLoadError(
            f"MLflow run {run_id!r} at {tracking_uri}: cannot get its 'guard' artifact ({err.message}); "
            "runs logged before this version have none: export from the run's checkpoint instead"
        ) from err
    local_path = Path(local)
    if local_path.resolve() != folder.resolve():
        folder.mkdir(parents=True, exist_ok=True)
        for item in local_path.iterdir():
            item.replace(folder / item.name)
        local_path.rmdir()
    _update_card(folder, source=f"MLflow run {run_id}", metrics=dict(run.data.metrics))
    return Guard.from_pretrained(folder)


def from_model(
    ref: str,
    folder: Path,
    max_length: int | None,
    threshold: float | None,
    seed: int,
    normalise_text: bool | None = None,
) -> Guard:
    """A model reference: a guard folder (its ``harmaug_guard.json`` and card are kept unless
    overridden), a trained student folder, or a base encoder whose fresh head is seeded.

    ``normalise_text`` true adds the text normaliser; ``None`` keeps the tokenizer as it is saved."""
    saved = Path(ref).expanduser()
    known = GuardSettings.load(saved) if (saved / GUARD_CONFIG).is_file() else None
    if max_length is None and known is None:
        raise ConfigError(
            f"--max_length is required with --model {ref}: it has no {GUARD_CONFIG}; give the "
            "max_length the student was trained with"
        )
    settings = GuardSettings(
        max_length=max_length if max_length is not None else known.max_length,
        threshold=threshold if threshold is not None else (known.threshold if known else 0.5),
    )
    torch.manual_seed(seed)
    student = load_sequence_classifier(
        ref, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    card_file = saved / "card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {"student_base": ref}
    card["source"] = f"model {ref}"
    tokenizer = load_tokenizer(ref)
    if normalise_text:
        install_normaliser(tokenizer)
    elif normalise_text is False and has_normaliser(tokenizer):
        raise ConfigError(f"--normalise_text false: {ref}'s tokenizer already normalises text")
    categories = GuardCategories.load(saved) if saved.is_dir() else None
    write_guard_folder(student, tokenizer, folder, settings, card, categories)
    return Guard.from_model(student, tokenizer, settings, categories)


# -- ONNX -------------------------------------------------------------------------------------
class _LogitsOnly(torch.nn.Module):
    """Positional inputs in, logits (and category logits, with a head) out: the ONNX graph's signature."""

    def __init__(self, model: Any, names: list[str], head: CategoryHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.head = head
        if head is not None:
            head.attach(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(**dict(zip(self.names, inputs))).logits
        return logits if self.head is None else (logits, self.head())


def export_onnx(folder: Path, out: Path | None = None, opset: int = ONNX_OPSET) -> Path:
    """Export the folder's student to ONNX with dynamic batch and sequence axes.

    Uses the TorchScript-based exporter (``dynamo=False``): in torch 2.13 the dynamo exporter fails
    on the transformers encoders we ship (MiniLM's BERT masks), while this one is exact to ~1e-7.
    """
    require_onnxruntime("ONNX export")
    out = out or folder / ONNX_FILE
    model = load_sequence_classifier(str(folder))
    tokenizer = load_tokenizer(str(folder))
    categories = GuardCategories.load(folder)
    names = [n for n in model_input_names(model) if n in tokenizer("a", "b")]
    example = tokenizer(
        ["a short example", "a"], ["and its response", "b"], padding=True, return_tensors="pt"
    )
    head = categories.head if categories is not None else None
    wrapper = _LogitsOnly(model, names, head).eval()  # eval first: export restores the wrapper's mode
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    outputs = ["logits"] + ([CATEGORY_OUTPUT] if head is not None else [])
    torch.onnx.export(
        wrapper,
        tuple(example[name] for name in names),
        str(out),
        input_names=names,
        output_names=outputs,
        dynamic_axes={**axes, **{name: {0: "batch"} for name in outputs}},
        opset_version=opset,
        dynamo=False,
    )
    return out


def quantize_int8(onnx_path: Path, out: Path | None = None) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised at run time) for CPU serving."""
    require_onnxruntime("int8 quantisation")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = out or onnx_path.with_name(INT8_FILE)
    quantize_dynamic(onnx_path, out, weight_type=QuantType.QInt8)
    return out


# -- verification -----------------------------------------------------------------------------
def verification_sample(size: int, source: str = DEFAULT_SAMPLE) -> tuple[list[str], list[str | None]]:
    """Prompts from ``source``; every other row gets the next prompt as its response, so both the
    prompt-only and the pair path are compared."""
    rows = load_examples(DataSource(path=source, label_field=None, limit=size + 1)).examples
    prompts = [row.prompt for row in rows[:size]]
    responses = [rows[i + 1].prompt if i % 2 else None for i in range(len(prompts))]
    return prompts, responses


def max_abs_diff(reference: list[float], other: list[float]) -> float:
    return float(max(abs(a - b) for a, b in zip(reference, other, strict=True)))


def category_max_abs_diff(
    reference: list[dict[str, float]], other: list[dict[str, float]] | None, fmt: str
) -> float:
    """Largest P(category) difference over rows and categories; a format that lost them is an error."""
    if other is None:
        raise ModelLoadError(f"{fmt}: the exported guard gives no categories, the trained one does")
    return float(max(abs(a[name] - b[name]) for a, b in zip(reference, other, strict=True) for name in a))


def export(
    folder: Path,
    reference: Guard,
    formats: tuple[str, ...] = FORMATS,
    sample_size: int = 32,
    sample_source: str = DEFAULT_SAMPLE,
) -> dict[str, Any]:
    """Add the ONNX formats to a guard folder; reload every format and compare it with ``reference``
    (the student as it was in memory); write the report and add it to the model card."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"--formats: unknown {unknown}; choose from {list(FORMATS)}")
    prompts, responses = verification_sample(sample_size, sample_source)
    reference_scores = reference.score_all(prompts, responses)
    expected = reference_scores.p_unsafe
    files: dict[str, Path] = {"hf": folder}
    if "onnx" in formats or "int8" in formats:
        files["onnx"] = export_onnx(folder)
    if "int8" in formats:
        files["int8"] = quantize_int8(files["onnx"])
    checks = {}
    threshold = reference.threshold
    for fmt, path in files.items():
        loaded = Guard.from_pretrained(path).score_all(prompts, responses)
        scores = loaded.p_unsafe
        # a score can move a lot where it does not matter (far from the threshold): the label flips
        # say what a user of the guard would see change
        flips = sum((a > threshold) != (b > threshold) for a, b in zip(expected, scores))
        checks[fmt] = {
            "file": path.name,
            "max_abs_diff": max_abs_diff(expected, scores),
            "label_flips": flips,
        }
        if reference_scores.categories is not None:
            checks[fmt]["category_max_abs_diff"] = category_max_abs_diff(
                reference_scores.categories, loaded.categories, fmt
            )
        log.info(
            "%s: max abs diff %.2e, %d label flips at %.2f on %d rows",
            fmt,
            checks[fmt]["max_abs_diff"],
            flips,
            threshold,
            len(prompts),
        )
        if flips:
            log.warning(
                "%s: %d of %d verification rows change label at threshold %.2f: check this format's "
                "metrics on your eval set before serving it",
                fmt,
                flips,
                len(prompts),
                threshold,
            )
    report = {"folder": str(folder), "sample_rows": len(prompts), "verification": checks}
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    _update_card(folder, verification=checks)
    return report


# -- CLI --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmaug export",
        description=(
            "Export a trained student as a Hugging Face folder (safetensors, tokenizer, model card, "
            f"{GUARD_CONFIG}), ONNX ({ONNX_FILE}) and dynamic int8 ONNX ({INT8_FILE}), each checked "
            "against the PyTorch scores on a sample."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a Lightning checkpoint of a DistillationModule (.ckpt)")
    source.add_argument("--mlflow_run", help="an MLflow run id whose 'guard' artifact to export")
    source.add_argument("--model", help="a model folder or reference (a base encoder gets a fresh head)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tracking_uri", default="sqlite:///mlruns/mlflow.db", help="with --mlflow_run")
    parser.add_argument(
        "--max_length",
        type=int,
        help="the data module's max_length (checkpoint; model without harmaug_guard.json)",
    )
    parser.add_argument(
        "--threshold", type=float, help="with --model (default: its harmaug_guard.json's, else 0.5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds a fresh head (with --model)")
    parser.add_argument(
        "--normalise_text",
        choices=("true", "false"),
        help="the text normaliser in the saved tokenizer (NFKC, invisible characters removed, long words "
        "split), as data.normalise_text trained it; default: true with --checkpoint, with --model as "
        "the model's tokenizer is",
    )
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--sample_size", type=int, default=32, help="rows compared after export")
    parser.add_argument(
        "--sample_data", default=DEFAULT_SAMPLE, help="JSON/JSONL/CSV file with a 'prompt' field"
    )
    return parser


def main(argv: list[str]) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.checkpoint:
        reference = from_checkpoint(args.checkpoint, out, args.max_length, args.normalise_text != "false")
    elif args.mlflow_run:
        reference = from_mlflow_run(args.mlflow_run, args.tracking_uri, out)
    else:
        normalise = None if args.normalise_text is None else args.normalise_text == "true"
        reference = from_model(args.model, out, args.max_length, args.threshold, args.seed, normalise)
    report = export(out, reference, tuple(args.formats), args.sample_size, args.sample_data)
    for fmt, check in report["verification"].items():
        where = out if fmt == "hf" else out / check["file"]
        diff, flips = check["max_abs_diff"], check["label_flips"]
        print(f"{fmt:>5}: {where}  max abs diff {diff:.2e}, label flips {flips}")
    return report


def console_main(argv: list[str]) -> None:
    """``harmaug export ...``: our errors as one line and exit status 2, like the Trainer commands."""
    with one_line_errors("harmaug export"):
        main(argv)
