"""Every shipped pack parses AND instantiates (model, data module, trainer) through the CLI.

Each pack is layered with an override that swaps in tiny models (tiny llama for generator and
responder, tiny guard for an LLM teacher, tiny student), local JSONL files for every data source
(hub datasets included) and the CPU, as a user would layer a pack; ``main(..., run=False)`` builds
everything LightningCLI builds for ``fit`` without running it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from harmaug_pl.backends import OpenAICompatibleBackend, TransformersBackend, VLLMBackend
from harmaug_pl.cli.lightning_cli import HarmAugCLI, HarmAugTrainer, main
from harmaug_pl.package_refs import PACKAGE_ROOT as PACKAGE_DIR
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from harmaug_pl.training.callbacks.eval_plots import EvalPlots
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.callbacks.student_export import StudentExport
from harmaug_pl.training.datamodule import HarmAugDataModule
from harmaug_pl.training.distillation import DistillationModule
from tests.helpers import write_jsonl

PACKS = sorted((PACKAGE_DIR / "packs").glob("*.yaml"))
LOCAL_SOURCE = {  # every DataSource setting, so nothing of the pack's hub source survives the merge
    "hf_name": None, "hf_config": None, "split": "train", "format": None, "data_files": None,
    "prompt_field": "prompt", "response_field": "response", "label_field": "label",
    "hash_range": None, "on_bad_row": "error", "preset": None,
}  # fmt: skip


def tiny_override(pack: dict, folder: Path, llama: Path, guard: Path, student: Path) -> dict:
    """A layer that keeps the pack's classes and numbers but points models, data and outputs at tiny/tmp."""
    rows = folder / "rows.jsonl"
    write_jsonl(rows, [
        {"prompt": "how do I bake bread?", "response": None, "label": 0},
        {"prompt": "write a rude joke about placeholder people", "response": "Sure.", "label": 1},
    ])  # fmt: skip
    source = {**LOCAL_SOURCE, "path": str(rows)}
    data = pack["data"]["init_args"]
    models = {"generator": llama, "responder": llama, "teacher": guard}
    stages = {}
    for stage in ("generator", "responder", "teacher"):
        backend = data.get(stage, {}).get("init_args", {}).get("backend")
        if backend is not None:  # a vLLM backend has no device: it is instantiated, never started
            kind = backend["class_path"].rsplit(".", 1)[1]
            extra = {
                "VLLMBackend": {},
                "OpenAICompatibleBackend": {"tokenizer": str(models[stage])},  # the server is never asked
            }.get(kind, {"device": "cpu"})
            stages[stage] = {"init_args": {"backend": {"init_args": {"model": str(models[stage]), **extra}}}}
    return {
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(folder / "runs"),
            "logger": {"init_args": {"tracking_uri": f"sqlite:///{folder.parent / 'mlflow.db'}"}},
        },
        "model": {"init_args": {"student": str(student)}},
        "data": {
            "init_args": {
                "data_dir": str(folder / "data"),
                "seed_data": source,
                "eval_sets": {name: source for name in data["eval_sets"]},
                **stages,
            }
        },
        "export": {"export_dir": str(folder / "student")},
    }


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all packs, so the MLflow sqlite store is created once (it takes seconds)."""
    return tmp_path_factory.mktemp("packs")


@pytest.fixture
def instantiate(
    pack_dir: Path, tiny_llama: Path, tiny_guard: Path, tiny_student: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str, str], tuple[dict, HarmAugCLI, Path]]:
    """``(pack name, folder name) -> (pack YAML, CLI built with run=False, folder)``."""

    def build(name: str, folder_name: str) -> tuple[dict, HarmAugCLI, Path]:
        folder = pack_dir / folder_name
        folder.mkdir()
        monkeypatch.chdir(folder)  # the packs' relative paths (checkpoints) land here
        monkeypatch.setattr(sys, "argv", ["harmaug"])  # not pytest's own arguments
        pack = yaml.safe_load((PACKAGE_DIR / "packs" / f"{name}.yaml").read_text())
        override = folder / "tiny.yaml"
        override.write_text(yaml.safe_dump(tiny_override(pack, folder, tiny_llama, tiny_guard, tiny_student)))
        return pack, main(["--config", name, "--config", str(override)], run=False), folder

    return build


@pytest.mark.parametrize("name", [p.stem for p in PACKS])
def test_pack_instantiates_with_tiny_models(
    name: str, instantiate, tiny_llama: Path, tiny_guard: Path, tiny_student: Path
) -> None:
    pack, cli, folder = instantiate(name, name)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, DistillationModule) and isinstance(dm, HarmAugDataModule)
    assert isinstance(trainer, HarmAugTrainer) and isinstance(trainer.logger, MLFlowLogger)

    # the pack's numbers survive the layering; ${...} follow the override
    init = pack["model"]["init_args"]
    assert model.hparams.learning_rate == init["learning_rate"]
    assert model.hparams.weight_decay == init["weight_decay"]
    assert model.hparams.warmup_steps == init["warmup_steps"]
    assert dm.tokenizer_ref == str(tiny_student) and dm.threshold == model.hparams.threshold
    assert dm.max_length == pack["data"]["init_args"]["max_length"]
    assert sorted(dm.eval_set_names) == sorted(pack["data"]["init_args"]["eval_sets"])
    assert trainer.max_epochs == pack["trainer"]["max_epochs"] and trainer.gradient_clip_val == 1.0
    assert trainer.precision == pack["trainer"]["precision"]
    assert dm.tokenizer.pad_token is not None  # the student's tokenizer loads

    # every configured stage is there, of the pack's class, on the tiny models
    for stage in ("generator", "responder", "teacher"):
        component = getattr(dm.pipeline, stage)
        expected_class = pack["data"]["init_args"][stage]["class_path"].rsplit(".", 1)[1]
        assert type(component).__name__ == expected_class
        if hasattr(component, "backend"):
            assert component.backend.model_id == str(tiny_guard if stage == "teacher" else tiny_llama)
    teacher = dm.pipeline.teacher
    if isinstance(teacher, LlamaGuardTeacher) and isinstance(teacher.backend, TransformersBackend):
        # a transformers LLM teacher really scores on the CPU (4-bit too: bitsandbytes has CPU kernels)
        scores = dm.pipeline.teacher.score(["how do I bake bread?"], [None])
        assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0
        dm.pipeline.teacher.close()

    # harm categories: one taxonomy for the module and the data module; a Llama-Guard teacher reads its codes
    assert model.categories == dm.categories and len(model.categories) in (8, 13, 14)
    assert (model.category_head is not None) == bool(init.get("category_weight"))
    if isinstance(teacher, LlamaGuardTeacher):
        assert dm.pipeline.category_codes == [c["code"] for c in model.categories]

    callbacks = {type(c): c for c in trainer.callbacks}
    assert StudentExport in callbacks and EvalPlots in callbacks and EvalReporter in callbacks
    assert callbacks[StudentExport].export_dir == folder / "student"
    checkpoint = callbacks[ModelCheckpoint]
    assert checkpoint.monitor == "val/auprc" and checkpoint.mode == "max"


def test_deberta_large_is_the_papers_recipe(instantiate) -> None:
    """Section 2 of the recipe, as instantiated (bf16-mixed kept; it runs on the CPU too)."""
    pack, cli, _ = instantiate("deberta_large", "deberta_large_recipe")
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer

    assert model.hparams.learning_rate == 3e-5 and model.hparams.weight_decay == 0.1
    assert model.hparams.warmup_steps == 100 and model.hparams.alpha == 0.5 and model.hparams.threshold == 0.5
    assert trainer.accumulate_grad_batches == 8 and dm.batch_size == 32  # 256 rows per optimiser step
    assert trainer.max_epochs == 3 and trainer.gradient_clip_val == 1.0
    assert trainer.precision == "bf16-mixed"
    assert dm.max_length == 1024 and dm.balanced_sampling and dm.val_fraction == 0.1 and dm.augment
    assert isinstance(dm.pipeline.teacher, LlamaGuardTeacher) and dm.pipeline.teacher.suffix == "\n\n"
    # the paper's four sets and XSTest, each from its shipped preset
    names = ["harmbench", "openai_moderation", "toxicchat", "wildguardmix", "xstest"]
    assert sorted(dm.eval_set_names) == names
    presets = {name: spec["preset"] for name, spec in pack["data"]["init_args"]["eval_sets"].items()}
    assert presets == dict(zip(names, names))
    assert dm.eval_sources["toxicchat"].path is not None and dm.eval_sources["toxicchat"].hf_name is None


def test_deberta_large_runs_every_llm_on_vllm(instantiate) -> None:
    _, cli, _ = instantiate("deberta_large", "deberta_large_vllm")
    pipeline = cli.datamodule.pipeline
    backends = [pipeline.generator.backend, pipeline.responder.backend, pipeline.teacher.backend]
    assert all(isinstance(b, VLLMBackend) and b.isolate for b in backends)
    assert [b.settings["dtype"] for b in backends] == ["bfloat16"] * 3
    # generator and responder have identical settings, so they share one engine
    assert backends[0]._key == backends[1]._key != backends[2]._key
    assert backends[2].describe()["backend"] == "vllm"  # describes itself without starting an engine


def test_consumer_24gb_teacher_is_4bit_and_the_student_fits_24gb(instantiate) -> None:
    _, cli, _ = instantiate("consumer_24gb", "consumer_24gb_memory")
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    teacher_backend = dm.pipeline.teacher.backend
    assert isinstance(teacher_backend, TransformersBackend)
    assert teacher_backend.quantization == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert isinstance(dm.pipeline.generator.backend, TransformersBackend)
    assert model.hparams.gradient_checkpointing and dm.max_length == 512
    assert dm.batch_size * trainer.accumulate_grad_batches == 256


def test_multi_gpu_is_ddp_with_sharded_vllm(instantiate) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    _, cli, _ = instantiate("multi_gpu", "multi_gpu_ddp")
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert isinstance(cli.datamodule.pipeline.teacher.backend, VLLMBackend)


def test_remote_vllm_sends_every_llm_to_a_server_and_holds_no_key(instantiate) -> None:
    pack, cli, _ = instantiate("remote_vllm", "remote_vllm_http")
    pipeline = cli.datamodule.pipeline
    backends = [pipeline.generator.backend, pipeline.responder.backend, pipeline.teacher.backend]
    assert all(isinstance(b, OpenAICompatibleBackend) and b.server == "vllm" for b in backends)
    assert {b.http.api_key_env for b in backends} == {"HARMAUG_LLM_API_KEY"}  # a name, never the key
    assert backends[2].top_logprobs is None  # verdict tokens asked for by id (logprob_token_ids)
    assert isinstance(pipeline.teacher, LlamaGuardTeacher) and pipeline.teacher.suffix == "\n\n"
    text = (PACKAGE_DIR / "packs" / "remote_vllm.yaml").read_text()
    assert "vllm serve google/gemma-1.1-2b-it" in text and "vllm serve meta-llama/Llama-Guard-3-8B" in text
    # same student, data and evaluation as the paper's pack
    reference = yaml.safe_load((PACKAGE_DIR / "packs" / "deberta_large.yaml").read_text())
    assert pack["model"] == reference["model"]
    assert pack["data"]["init_args"]["eval_sets"] == reference["data"]["init_args"]["eval_sets"]
