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


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "float8"], "--dtype: expected float32, bfloat16 or float16, got 'float8'"),
    (["--quant", "int3"], "--quant: expected one of int4, int8, nf4, got 'int3'"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected >= 1, got 0"),
])  # fmt: skip
def test_bad_options_give_one_line_errors(model_dir, capsys, extra, message):
    code, out, err = generate(["--model", str(model_dir), "--prompt", "x", *extra], capsys)
    assert code == 2 and out == "" and err == f"llmkern generate: error: {message}\n"


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
