"""The shipped demo pair (llmkern/models/demo/): loadable, consistent, within budget, and as good as their cards say."""

import json
import re

import pytest
import torch

from llmkern.cli import main as cli_main
from llmkern.generation import GenerationConfig, Tokenizer
from llmkern.models import DEMO_MODELS, demo_model_path, load_model
from llmkern.train import preset
from llmkern.train.demo import SAMPLE_TOKENS, sample_batches
from llmkern.train.pretrain import evaluate


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_loads_with_its_preset_config_and_tokenizer(name):
    path = demo_model_path(name)
    model = load_model(path)
    assert model.config == preset(name).model and next(model.parameters()).dtype == torch.bfloat16
    tok, gen = Tokenizer.from_pretrained(path), GenerationConfig.from_pretrained(path)
    assert len(tok) <= model.config.vocab_size
    assert (gen.bos_token_id, gen.eos_token_ids, gen.pad_token_id) == (tok.bos_token_id, (tok.eos_token_id,),
                                                                       tok.pad_token_id)


def test_the_pair_shares_one_tokenizer_and_fits_the_size_budget():
    target, draft = (demo_model_path(n) for n in DEMO_MODELS)
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    total = sum(f.stat().st_size for d in (target, draft) for f in d.iterdir())
    assert total < 40e6, f"the demo models take {total / 1e6:.1f} MB (budget: 40 MB)"


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_held_out_loss_is_what_the_model_card_states(name):
    path = demo_model_path(name)
    card = (path / "README.md").read_text()
    stated = float(re.search(r"`heldout_sample\.jsonl` \(\d+ tokens[^|]*\| ([0-9.]+)", card).group(1))
    texts = [json.loads(line)["text"] for line in (path / "heldout_sample.jsonl").read_text().splitlines()]
    tok = Tokenizer.from_pretrained(path).backend
    loss = evaluate(load_model(path, dtype=torch.float32), sample_batches(texts, tok, preset(name), SAMPLE_TOKENS))
    assert loss == pytest.approx(stated, rel=0.05)
    unigram = float(re.search(r"unigram baseline, same tokens \| ([0-9.]+)", card).group(1))
    assert loss < unigram  # the card's quality bar, on the sample too


def test_generate_defaults_to_the_demo_target(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--prompt", "import os\n", "--max-new-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr()
    assert e.value.code == 0 and "using the built-in demo model" in out.err and out.out.strip()
