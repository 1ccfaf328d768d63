"""Stop strings over streamed text, a request's output stream, and generation_config.json."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import GenerationConfig as HFGenerationConfig

from llmkern.generation import GenerationConfig, OutputStream, SamplingParams, StopStringMatcher, Tokenizer


def safe_prefix(seen: str, stops) -> str:
    """Reference: the output so far, cut before the earliest stop string, or, with none yet, without the
    longest end that could still grow into a stop string."""
    hits = [(seen.find(s), -len(s)) for s in stops if s in seen]
    if hits:
        return seen[: min(hits)[0]]
    hold = max((n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])), default=0)
    return seen[: len(seen) - hold]


@pytest.mark.parametrize("seed", range(40))
def test_streamed_stop_strings_match_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab#\n "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(60))
    matcher, emitted, seen = StopStringMatcher(stops), "", ""
    while text and not matcher.stopped:
        n = rng.randint(1, 5)
        piece, text = text[:n], text[n:]
        seen += piece
        emitted += matcher.feed(piece)
        assert emitted == safe_prefix(seen, stops), (stops, seen)  # never more, never less than is safe
    if not matcher.stopped:
        emitted += matcher.flush()
        assert emitted == seen
    else:
        assert matcher.matched in stops and seen[len(emitted):].startswith(matcher.matched)


def test_stop_string_spanning_pieces_and_included():
    m = StopStringMatcher(["</answer>"], include_stop_str_in_output=True)
    assert m.feed("42 </an") == "42 "
    assert m.feed("swer> trailing") == "</answer>" and m.matched == "</answer>"
    with pytest.raises(RuntimeError):
        m.feed("more")
    m = StopStringMatcher(["END", "NDX"])
    assert m.feed("aEN") == "a" and m.feed("DX") == "" and m.matched == "END"  # earliest start wins
    assert StopStringMatcher([]).feed("anything") == "anything"
    with pytest.raises(ValueError, match=r"stop\[0\]"):
        StopStringMatcher([""])


@pytest.fixture(scope="module")
def tok(llama3_dir):
    return Tokenizer.from_pretrained(llama3_dir)


def run(tok, params, ids, eos=()):
    out = OutputStream(tok, params, tok.encode("prompt:"), eos_token_ids=eos)
    deltas = []
    for t in ids:
        delta, reason = out.append(t)
        deltas.append(delta)
        if reason:
            break
    return out, deltas


def test_output_stream_stop_string_spanning_tokens(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    out, deltas = run(tok, SamplingParams(stop=["fox jumps"]), ids)
    assert out.finish_reason == "stop" and out.stop_reason == "fox jumps"
    assert out.text == "".join(deltas) == "The quick brown "
    assert len(out.token_ids) < len(ids)


def test_output_stream_eos_stop_ids_and_length(tok):
    eot = tok.token_to_id("<|eot_id|>")
    ids = [*tok.encode("Hello world", add_special_tokens=False), eot, *tok.encode(" more", add_special_tokens=False)]
    out, _ = run(tok, SamplingParams(), ids, eos=[eot])
    assert (out.text, out.finish_reason, out.stop_reason, out.token_ids[-1]) == ("Hello world", "stop", eot, eot)
    out, _ = run(tok, SamplingParams(ignore_eos=True), ids, eos=[eot])
    assert out.text == "Hello world more" and out.finish_reason is None
    assert out.finish() == "" and out.finish_reason == "length"
    stop_id = ids[1]
    out, _ = run(tok, SamplingParams(stop_token_ids=[stop_id]), ids)
    assert out.stop_reason == stop_id and out.text == tok.decode(ids[:1])
    out, _ = run(tok, SamplingParams(max_tokens=2), ids)
    assert out.finish_reason == "length" and out.token_ids == ids[:2] and out.text == tok.decode(ids[:2])
    with pytest.raises(RuntimeError, match="finished"):
        out.append(ids[2])


def test_output_stream_flushes_held_text_at_length(tok):
    head = tok.encode("cafe ##", add_special_tokens=False)
    ids = head + tok.encode(" done", add_special_tokens=False)
    out, deltas = run(tok, SamplingParams(stop=["## stop"], max_tokens=len(head)), ids)
    assert out.finish_reason == "length" and out.text == "".join(deltas) == "cafe ##"
    assert "#" not in "".join(deltas[:-1]) and deltas[-1].endswith("##")  # '##' held until the end decided it


def write(tmp_path, data):
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    return tmp_path


def test_generation_config_llama31(tmp_path):
    d = write(tmp_path, {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                         "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.43.0.dev0"})
    cfg = GenerationConfig.from_pretrained(d)
    assert list(cfg.eos_token_ids) == HFGenerationConfig.from_pretrained(d).eos_token_id
    assert cfg.bos_token_id == 128000
    p = cfg.sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 0, None)
    assert cfg.sampling_params(temperature=0, max_tokens=5).greedy


def test_generation_config_greedy_unless_do_sample(tmp_path):
    d = write(tmp_path, {"eos_token_id": 151643, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.05,
                         "max_new_tokens": 2048})
    cfg = GenerationConfig.from_pretrained(d)
    assert cfg.eos_token_ids == (151643,)
    p = cfg.sampling_params()
    assert p.greedy and p.top_k == 20 and p.repetition_penalty == 1.05 and p.max_tokens == 2048
    assert cfg.sampling_params(temperature=0.7).temperature == 0.7
    assert GenerationConfig.from_pretrained(tmp_path / "absent") == GenerationConfig()
    assert GenerationConfig().sampling_params().greedy


@pytest.mark.parametrize("data, name", [
    ({"eos_token_id": "2"}, "eos_token_id"), ({"eos_token_id": [1, -2]}, "eos_token_id"),
    ({"temperature": "hot"}, "temperature"), ({"top_k": 2.5}, "top_k"), ({"do_sample": 1}, "do_sample"),
])
def test_generation_config_bad_values_named(tmp_path, data, name):
    with pytest.raises(ValueError, match=f"generation_config.json.*{name}"):
        GenerationConfig.from_pretrained(write(tmp_path, data))
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)


def test_the_package_example_loop(tok, tmp_path):
    """The loop in llmkern.generation's docstring, with a stand-in model that spells a reply, then EOS."""
    from llmkern.generation import make_generator, sample

    reply = tok.encode("Hi there 👋 friend", add_special_tokens=False) + [tok.eos_token_id]
    write(tmp_path, {"eos_token_id": tok.eos_token_id, "do_sample": True, "temperature": 0.9})
    defaults = GenerationConfig.from_pretrained(tmp_path)
    params = defaults.sampling_params(max_tokens=64, stop=["friend"], seed=3)
    prompt = tok.encode("Say hi")
    out = OutputStream(tok, params, prompt, eos_token_ids=defaults.eos_token_ids)
    generator, deltas = make_generator(params), []

    def model_step(step):  # logits [1, V] strongly preferring the reply's next token
        logits = torch.zeros(1, len(tok))
        logits[0, reply[step]] = 30.0
        return logits

    while not out.finished:
        token = sample(model_step(len(out.token_ids)), [params], [prompt], [out.token_ids], [generator])
        delta, reason = out.append(token[0])
        deltas.append(delta)
    assert out.text == "".join(deltas) == "Hi there 👋 " and out.stop_reason == "friend"


def test_generation_config_falls_back_to_config_json(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0)
    cfg.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    ours, ref = GenerationConfig.from_pretrained(tmp_path), HFGenerationConfig.from_model_config(cfg)
    assert (list(ours.eos_token_ids), ours.bos_token_id, ours.pad_token_id) == (
        ref.eos_token_id, ref.bos_token_id, ref.pad_token_id)
    assert ours.sampling_params().greedy
