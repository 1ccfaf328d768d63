"""`llmkern generate`: streamed text on stdout, speeds on stderr, one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from llm_refs import write_llama_checkpoint

from llmkern import LLM, SamplingParams
from llmkern.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("cli"))[1]


def generate(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_generate_streams_what_the_api_generates(model_dir, capsys):
    code, out, err = generate(["--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "12",
                               "--temperature", "0"], capsys)
    ref = LLM(model_dir).generate("Hello", SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert code == 0 and out == ref.text + "\n"
    assert f"prompt: {ref.num_prompt_tokens} tokens" in err and "tokens/s" in err
    assert f"decode: {ref.num_generated_tokens} tokens" in err


def test_generate_chat_and_sampling_options(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "Hi!", "--chat", "--max-new-tokens", "6", "--temperature", "0.8",
            "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--dtype", "bfloat16"]
    first, second = generate(args, capsys), generate(args, capsys)
    assert first[0] == 0 and first[1] == second[1], "same seed, same output"
    llm = LLM(model_dir, dtype="bfloat16")
    ref = llm.chat([{"role": "user", "content": "Hi!"}],
                   SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=6))[0]
    assert first[1] == ref.text + "\n"


def test_generate_system_message_min_p_and_repetition_penalty(model_dir, capsys):
    """--system goes before the prompt through the chat template; --min-p and --repetition-penalty reach the
    sampler: the output equals the API's with the same conversation and SamplingParams, and differs from
    the output without them (so the flags are not ignored)."""
    base = ["--model", str(model_dir), "--prompt", "Hi!", "--chat", "--max-new-tokens", "8", "--temperature", "1.5",
            "--seed", "1"]
    sampling = ["--min-p", "0.2", "--repetition-penalty", "1.3"]
    code, out, _ = generate([*base, "--system", "Be brief.", *sampling], capsys)
    llm = LLM(model_dir)
    params = SamplingParams(temperature=1.5, seed=1, max_tokens=8, min_p=0.2, repetition_penalty=1.3)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ref = llm.chat(messages, params)[0]
    assert code == 0 and out == ref.text + "\n"
    no_system = llm.chat(messages[1:], params)[0]
    no_sampling = llm.chat(messages, SamplingParams(temperature=1.5, seed=1, max_tokens=8))[0]
    assert ref.token_ids != no_system.token_ids and ref.token_ids != no_sampling.token_ids


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "float8"], "--dtype: expected float32, bfloat16 or float16, got 'float8'"),
    (["--quant", "int3"], "--quant: expected one of int4, int8, nf4, got 'int3'"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected >= 1, got 0"),
    (["--min-p", "1.5"], "--min-p: min_p must be in [0.0, 1.0], got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty: repetition_penalty must be in (0.0, inf), got 0.0"),
    (["--temperature", "-1"], "--temperature: temperature must be in [0.0, inf), got -1.0"),
    (["--top-p", "0"], "--top-p: top_p must be in (0.0, 1.0], got 0.0"),
    (["--top-k", "-2"], "--top-k: top_k must be >= -1, got -2"),
    (["--system", "Be brief."], "--system: needs --chat (the system message goes through the chat template)"),
])  # fmt: skip
def test_bad_options_give_one_line_errors(model_dir, capsys, monkeypatch, extra, message):
    import llmkern.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(llmkern.llm, "LLM", no_load)
    code, out, err = generate(["--model", str(model_dir), "--prompt", "x", *extra], capsys)
    assert code == 2 and out == "" and err == f"llmkern generate: error: {message}\n"


def test_generate_from_a_checkpoint_quantized_by_llmkern_quantize(model_dir, tmp_path, capsys):
    """`llmkern quantize` output runs with `llmkern generate` as the original does with --quant."""
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(model_dir), "--out", str(tmp_path), "--format", "int8", "--no-progress"])
    assert exit_info.value.code == 0
    capsys.readouterr()
    args = ["--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"]
    code, out, _ = generate(["--model", str(tmp_path), *args], capsys)
    assert code == 0
    assert (code, out) == generate(["--model", str(model_dir), "--quant", "int8", *args], capsys)[:2]


def test_missing_model_dir_from_the_command_line(tmp_path):
    """Through the real entry point: one line on stderr, no traceback, a failing exit code."""
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "llmkern.cli", "generate", "--model", str(missing), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"llmkern generate: error: --model: {missing} is not a directory\n"


def test_broken_checkpoint_gives_one_line_error(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    code, out, err = generate(["--model", str(broken), "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "model.safetensors" in err
