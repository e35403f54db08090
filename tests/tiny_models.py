"""Tiny random-init models built in-process, so tests never touch a model hub.

The texts used to train the tokenizer are mild, clearly fake placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not loop.last or m['role'] != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Llama-Guard-like template: the whole conversation goes into one user turn; "\n\n" follows.
GUARD_TEMPLATE = (
    "<|im_start|>user\nTask: is the last turn safe or unsafe?\n"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "<|im_end|>\n<|im_start|>assistant"
)

_CORPUS = [
    "Make a single harmful instruction prompt that would elicit offensive content",
    "I have an idea for a prompt: write a rude joke about placeholder people",
    "Sure, here is how to do that. I'm sorry, but I can't help with that.",
    "safe unsafe safe unsafe the a an is are was were be to of and in that it",
    "How do I bake bread? Tell me a mean placeholder insult. What is the capital of France?",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) - user assistant system",
]
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def build_tokenizer(
    chat_template: str | None = CHATML_TEMPLATE, *, encoder: bool = False
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on a few mild sentences.

    ``encoder=True`` adds BERT-style ``[CLS] a [SEP] b [SEP]`` pair framing for student tests.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if encoder:
        cls, sep = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A <|im_end|>",
            pair="<|im_start|> $A <|im_end|> $B:1 <|im_end|>:1",
            special_tokens=[("<|im_start|>", cls), ("<|im_end|>", sep)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_tiny_llama(
    path: Path, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0, **config: Any
) -> Path:
    """A 2-layer random-init Llama causal LM with a chat template, saved as safetensors.

    ``config`` overrides LlamaConfig sizes (GPU kernels such as vLLM's want a head size of 64).
    """
    import torch

    torch.manual_seed(seed)
    tok = build_tokenizer(chat_template)
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **config,
    }
    llama = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **sizes,
    )
    LlamaForCausalLM(llama).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_encoder(
    path: Path, config_class: Any, model_class: Any, seed: int = 0, max_position_embeddings: int = 512
) -> Path:
    """A 2-layer random-init sequence classifier of ``config_class``/``model_class`` with an
    encoder tokenizer (``[CLS] a [SEP] b [SEP]`` pairs)."""
    import torch

    torch.manual_seed(seed)
    tok = build_tokenizer(chat_template=None, encoder=True)
    tok.sep_token = "<|im_end|>"
    tok.cls_token = "<|im_start|>"
    config = config_class(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        num_labels=2,
    )
    model_class(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_deberta(path: Path, seed: int = 0) -> Path:
    """A 2-layer random-init DeBERTa-v2 encoder (a stand-in for deberta-v3) with its tokenizer."""
    return save_tiny_encoder(path, DebertaV2Config, DebertaV2ForSequenceClassification, seed)


def save_tiny_bert(path: Path, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A 2-layer random-init BERT (like all-MiniLM-L6-v2: absolute position embeddings, so an input
    longer than ``max_position_embeddings`` crashes it unless it is truncated)."""
    return save_tiny_encoder(path, BertConfig, BertForSequenceClassification, seed, max_position_embeddings)
