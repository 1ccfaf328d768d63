"""A Hugging Face checkpoint's tokenizer (tokenizer.json + tokenizer_config.json) through the `tokenizers` library.

Loading follows transformers 5 (tokenization_utils_base.py `_from_pretrained`, tokenization_utils_tokenizers.py):
- tokenizer.json is the whole pipeline (normalizer, pre-tokenizer, model, decoder, added tokens, and the
  post-processor that adds BOS/EOS when `add_special_tokens=True`);
- tokenizer_config.json names the special tokens (strings or AddedToken dicts), may add tokens
  (`added_tokens_decoder`), and may hold the chat template; a chat_template.jinja file (what transformers 5 saves)
  takes priority over it, and additional_chat_templates/NAME.jinja files add named templates;
- named special tokens missing from the vocabulary are added as special tokens, as transformers does.
One deliberate difference: transformers 5 ignores tokenizer_config's add_bos_token / add_eos_token when a
tokenizer.json exists (its post-processor decides). llmkern does the same, except that when tokenizer.json has no
post-processor at all it honours add_bos_token / add_eos_token, as transformers 4's Llama tokenizers did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

from llmkern._json import read_json_object
from llmkern.generation.chat_template import render_chat_template

# The named special tokens of transformers' tokenizers (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _token_content(value, where: str) -> str | None:
    """A special token given as a string or as an AddedToken dict ({"__type": "AddedToken", "content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or an AddedToken dict with 'content', got {value!r}")


def _added_token(value: dict, where: str) -> AddedToken:
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ValueError(f"{where}: expected an AddedToken dict with 'content', got {value!r}")
    return AddedToken(**{k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value})


def _load_chat_templates(directory: Path, config: dict) -> str | dict[str, str] | None:
    """The default template as a string, or {name: template} when the checkpoint has several."""
    templates = {}
    default_file = directory / "chat_template.jinja"
    if default_file.is_file():
        templates["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:  # template files take priority over tokenizer_config.json's entry
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):  # legacy form of several templates: [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in template}
    if template is not None and not isinstance(template, str):
        where = directory / "tokenizer_config.json"
        raise ValueError(f"{where}: chat_template must be a string or a list of templates")
    return template


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint. Build with `Tokenizer.from_pretrained(dir)`."""

    def __init__(
        self,
        backend: _HFTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
    ):
        self.backend = backend
        # Every named special token (bos_token, eos_token, ... and model-specific *_token entries) as a string:
        # these are also the variables chat templates see.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:  # as transformers does: a named special token the vocabulary lacks becomes an added token
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: llmkern needs the checkpoint's fast-tokenizer file tokenizer.json "
                "(sentencepiece-only tokenizer.model checkpoints can be converted by saving them once with "
                "transformers' AutoTokenizer)"
            )
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot be read by the tokenizers library ({e})") from e

        config_file = directory / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        if "added_tokens_decoder" not in config and (directory / "special_tokens_map.json").is_file():
            # Legacy checkpoints name their special tokens in special_tokens_map.json, which then wins.
            config = {**config, **read_json_object(directory / "special_tokens_map.json")}

        special = {name: _token_content(config.get(name), f"{config_file}: {name}") for name in SPECIAL_TOKEN_NAMES}
        # Model-specific named tokens (image_token, ...) given as strings are template variables too.
        special.update({k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            special.update({k: _token_content(v, f"{config_file}: extra_special_tokens.{k}") for k, v in extra.items()})

        vocab = backend.get_vocab(with_added_tokens=True)
        # Unnamed extra special tokens (a list; "additional_special_tokens" before transformers 5) the vocabulary
        # lacks are added as special tokens, as transformers does.
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, list):
            extra = [_token_content(t, f"{config_file}: extra_special_tokens[{i}]") for i, t in enumerate(extra)]
            missing = [t for t in extra if t not in vocab]
            if missing:
                backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        declared = config.get("added_tokens_decoder") or {}
        if not isinstance(declared, dict):
            raise ValueError(f"{config_file}: added_tokens_decoder must be a JSON object")
        new_tokens = [_added_token(v, f"{config_file}: added_tokens_decoder[{k}]") for k, v in declared.items()]
        new_tokens = [t for t in new_tokens if t.content not in vocab]
        if new_tokens:
            backend.add_tokens(new_tokens)

        # split_special_tokens: special-token text in the input is encoded as plain text (transformers' option).
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if backend.post_processor is None:
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            if add_bos or add_eos:
                cls._install_bos_eos(backend, special, add_bos, add_eos, config_file)

        return cls(backend, special, _load_chat_templates(directory, config))

    @staticmethod
    def _install_bos_eos(backend, special, add_bos, add_eos, config_file):
        """A post-processor adding BOS / EOS around each sequence (transformers' `update_post_processor`)."""
        for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
            if flag and special.get(name) is None:
                raise ValueError(f"{config_file}: add_{name} is true but no {name} is set")
        bos, eos = special.get("bos_token"), special.get("eos_token")
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        used = [t for flag, t in ((add_bos, bos), (add_eos, eos)) if flag]
        missing = [t for t in used if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)]
        )

    # ---- tokens ----
    def __len__(self) -> int:
        """Vocabulary size including added tokens (a model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    # ---- text <-> ids ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a str, got {type(text).__name__}")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list or a 1-D tensor). Special tokens are dropped unless skip_special_tokens=False."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list[str]:
        batch = [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in batch]
        return self.backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template source to use: `chat_template` (a template, or the name of one of the checkpoint's), else
        the checkpoint's default ('tool_use' when tools are given and the checkpoint has one)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                f"the checkpoint has several chat templates and no default; pick one of {sorted(templates)}"
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json or chat_template.jinja); "
                "pass chat_template= or use a plain prompt"
            )
        return templates

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool | str = False,
        **kwargs,
    ) -> str | list[int]:
        """The conversation (a list of {"role", "content", ...} dicts) rendered by the chat template, as
        transformers' apply_chat_template renders it; extra kwargs are template variables (they override the
        special tokens). With tokenize=True, the token ids of the rendered text: the template writes every special
        token itself, so no BOS/EOS is added. (Unlike transformers, add_generation_prompt defaults to True: llmkern
        renders chats to generate from them.)"""
        source = self.get_chat_template(chat_template, tools)
        text = render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
