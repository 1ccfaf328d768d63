"""A tiny Llama checkpoint with a tokenizer, for the generation API and CLI tests: the models tests' random
transformers model (tests/models/model_refs.py) and the generation tests' trained byte-level BPE with a
Llama-3 chat template (tests/generation/tokenizer_refs.py), saved together in one directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import processors

TESTS = Path(__file__).parent
sys.path[:0] = [str(TESTS / "models"), str(TESTS / "generation")]
import tokenizer_refs as gen  # noqa: E402
from model_refs import make_hf_model  # noqa: E402

VOCAB = 640  # >= the trained tokenizer's vocabulary (600 + special tokens)
EOT = "<|eot_id|>"


def write_llama_checkpoint(directory: Path):
    """(fp32 transformers model, directory): config.json + model.safetensors, tokenizer.json adding BOS,
    tokenizer_config.json with the Llama 3 chat template, generation_config.json with EOS <|eot_id|>."""
    tok = gen.train_byte_bpe(gen.LLAMA3_SPECIAL)
    assert tok.get_vocab_size() <= VOCAB
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]),
    ])  # fmt: skip
    config = {"bos_token": "<|begin_of_text|>", "eos_token": EOT, "chat_template": gen.LLAMA3_TEMPLATE}
    gen.write_checkpoint(directory, tok, config)
    hf = make_hf_model("llama", vocab_size=VOCAB)
    hf.save_pretrained(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": tok.token_to_id(EOT), "do_sample": False})
    )
    return hf, directory
