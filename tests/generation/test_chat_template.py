"""Chat templates rendered by llmkern against transformers' apply_chat_template on the same checkpoint."""

from __future__ import annotations

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from llmkern.generation import Tokenizer

from tokenizer_refs import CHATML_SPECIAL, LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE, train_byte_bpe, write_checkpoint

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly; use <b>HTML</b> & \"quotes\"."}
TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in Japanese? 日本語で 😀"},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo at a place <now> & \"then\"",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "\nI should call the tool.\n",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18°C, sunny"},
    {"role": "assistant", "content": "It is 18°C and sunny.", "reasoning_content": "Summarize.", "tool_calls": None},
]

CONVERSATIONS = {
    "single_user": TURNS[:1],
    "system_multi_turn": [SYSTEM, *TURNS],
    "tools": TOOL_TURNS,
}


@pytest.fixture(params=["llama3", "chatml"])
def ckpt(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_matches_transformers(ckpt, conversation, add_generation_prompt):
    ours, ref = Tokenizer.from_pretrained(ckpt), PreTrainedTokenizerFast.from_pretrained(ckpt)
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "tools" else None
    if ckpt.name.startswith("llama3") and conversation == "tools":
        messages = messages[:1]  # this Llama template only alternates user/assistant
    expected = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert text == expected
    ids = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == ref.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_without_whitespace_control(chatml_dir, add_generation_prompt):
    """Zephyr's template relies on trim_blocks / lstrip_blocks for its line breaks."""
    ours, ref = Tokenizer.from_pretrained(chatml_dir), PreTrainedTokenizerFast.from_pretrained(chatml_dir)
    messages = [SYSTEM, *TURNS]
    expected = ref.apply_chat_template(messages, chat_template=ZEPHYR_TEMPLATE, add_generation_prompt=add_generation_prompt,
                                       tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt, chat_template=ZEPHYR_TEMPLATE) == expected
    assert "<|user|>\nWhat is 2 + 2?<|im_end|>\n<|assistant|>" in expected


def test_template_variables_and_kwargs(chatml_dir, llama3_dir):
    """Extra keyword arguments reach the template (Qwen3's enable_thinking, Llama's date_string)."""
    ours, ref = Tokenizer.from_pretrained(chatml_dir), PreTrainedTokenizerFast.from_pretrained(chatml_dir)
    text = ours.apply_chat_template(TURNS[:1], enable_thinking=False)
    assert text == ref.apply_chat_template(TURNS[:1], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text.endswith("<think>\n\n</think>\n\n")
    ours, ref = Tokenizer.from_pretrained(llama3_dir), PreTrainedTokenizerFast.from_pretrained(llama3_dir)
    text = ours.apply_chat_template(TURNS[:1], date_string="01 Jan 2000")
    assert "Today Date: 01 Jan 2000" in text
    assert text == ref.apply_chat_template(TURNS[:1], add_generation_prompt=True, tokenize=False, date_string="01 Jan 2000")
    assert text.startswith("<|begin_of_text|>")  # bos_token variable


def test_continue_final_message(chatml_dir):
    ours, ref = Tokenizer.from_pretrained(chatml_dir), PreTrainedTokenizerFast.from_pretrained(chatml_dir)
    messages = [*TURNS[:1], {"role": "assistant", "content": "The answer is"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == ref.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text.endswith("The answer is")


def test_raise_exception_reaches_caller(llama3_dir):
    tok = Tokenizer.from_pretrained(llama3_dir)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        tok.apply_chat_template([TURNS[0], TURNS[0]])


def test_sandbox_blocks_python_internals(llama3_dir):
    tok = Tokenizer.from_pretrained(llama3_dir)
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(TURNS[:1], chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(TURNS[:1], chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable sandbox: no mutation of inputs
        tok.apply_chat_template(TURNS[:1], chat_template="{{ messages.append(1) }}")


def test_template_file_wins_and_named_templates(tmp_path):
    tok = train_byte_bpe(CHATML_SPECIAL)
    d = write_checkpoint(tmp_path, tok, {"chat_template": "config {{ messages[0].content }}"}, template_file="file {{ messages[0].content }}")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("tools {{ tools | length }}")
    ours, ref = Tokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(d)
    assert ours.chat_template == ref.chat_template
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(TURNS[:1], tools=tools) == ref.apply_chat_template(
            TURNS[:1], tools=tools, add_generation_prompt=True, tokenize=False
        )
    assert ours.apply_chat_template(TURNS[:1], chat_template="tool_use", tools=[]) == "tools 0"


def test_no_template_and_bad_messages(tmp_path, llama3_dir):
    d = write_checkpoint(tmp_path, train_byte_bpe(CHATML_SPECIAL), {})
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(d).apply_chat_template(TURNS[:1])
    tok = Tokenizer.from_pretrained(llama3_dir)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        tok.apply_chat_template([TURNS[0], "not a dict"])
    with pytest.raises(ValueError, match="cannot both be set"):
        tok.apply_chat_template(TURNS, continue_final_message=True)


def test_llama_template_is_the_one_in_config(llama3_dir):
    assert Tokenizer.from_pretrained(llama3_dir).get_chat_template() == LLAMA3_TEMPLATE
