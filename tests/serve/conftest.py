"""The tiny checkpoint the HTTP API tests serve (the servers themselves are in serve_refs.py)."""

from __future__ import annotations

import pytest
from llm_refs import write_llama_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(fp32 transformers model, directory) of the tiny Llama with a tokenizer and a Llama-3 chat template."""
    return write_llama_checkpoint(tmp_path_factory.mktemp("serve-tiny"))


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint):
    from serve_refs import ThreadServer  # imported here: the engine's tests run without the HTTP stack

    server = ThreadServer(tiny_checkpoint[1])
    yield server
    server.close()
