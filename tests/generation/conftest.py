"""Checkpoint directories with tiny tokenizers, shared by the generation tests (built once per session)."""

from __future__ import annotations

import pytest
from tokenizers import processors

from tokenizer_refs import (
    CHATML_SPECIAL,
    CHATML_TEMPLATE,
    LLAMA3_SPECIAL,
    LLAMA3_TEMPLATE,
    ZEPHYR_TEMPLATE,
    added_token_dict,
    train_byte_bpe,
    train_sentencepiece_bpe,
    write_checkpoint,
)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """Llama-3 style: BOS added by the tokenizer.json post-processor, template in tokenizer_config.json."""
    tok = train_byte_bpe(LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    return write_checkpoint(tmp_path_factory.mktemp("llama3"), tok, config)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    """Llama 2 / Mistral style: SentencePiece-like BPE with byte fallback."""
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "chat_template": ZEPHYR_TEMPLATE}
    return write_checkpoint(tmp_path_factory.mktemp("spm"), train_sentencepiece_bpe(), config)


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory):
    """Qwen style: no BOS, AddedToken dicts for special tokens, template in chat_template.jinja (transformers 5)."""
    tok = train_byte_bpe(CHATML_SPECIAL)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "bos_token": None,
        "eos_token": added_token_dict("<|im_end|>"),
        "pad_token": added_token_dict("<|endoftext|>"),
        "unk_token": None,
    }
    return write_checkpoint(tmp_path_factory.mktemp("chatml"), tok, config, template_file=CHATML_TEMPLATE)
