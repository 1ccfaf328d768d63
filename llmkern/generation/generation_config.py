"""A checkpoint's generation_config.json: its EOS token ids and the sampling defaults it recommends."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from llmkern._json import read_json_object
from llmkern.generation.sampling import SamplingParams

# Keys of generation_config.json that become SamplingParams defaults (max_new_tokens becomes max_tokens).
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _ids(value, where: str) -> tuple[int, ...]:
    """eos_token_id is an int or a list of ints (Llama 3.1 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>)."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: expected a token id (int >= 0) or a list of them, got {value!r}")
    return tuple(values)


@dataclass(frozen=True)
class GenerationConfig:
    """The fields of generation_config.json llmkern uses; None where the checkpoint sets nothing."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GenerationConfig":
        """Read DIR/generation_config.json. Without one, the special token ids of config.json (transformers'
        `GenerationConfig.from_model_config`), else all-None defaults."""
        path = Path(directory) / "generation_config.json"
        if not path.is_file():
            path = Path(directory) / "config.json"
            if not path.is_file():
                return cls()
            data = read_json_object(path)
            data = {k: data.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
            return cls.from_dict(data, where=str(path))
        return cls.from_dict(read_json_object(path), where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "generation config") -> "GenerationConfig":
        values = {"eos_token_ids": _ids(data.get("eos_token_id"), f"{where}: eos_token_id")}
        for name in ("bos_token_id", "pad_token_id"):
            ids = _ids(data.get(name), f"{where}: {name}")
            values[name] = ids[0] if ids else None
        for f in fields(cls):
            if f.name in values or data.get(f.name) is None:
                continue
            v = data[f.name]
            kind = {"do_sample": bool, "top_k": int, "max_new_tokens": int, "max_length": int}.get(f.name, float)
            ok = isinstance(v, bool) if kind is bool else (
                not isinstance(v, bool) and isinstance(v, int if kind is int else (int, float))
                and (kind is int or math.isfinite(v))
            )
            if not ok:
                raise ValueError(f"{where}: {f.name} must be {kind.__name__}, got {v!r}")
            values[f.name] = v
        return cls(**values)

    def sampling_defaults(self) -> dict:
        """The sampling values the checkpoint sets (temperature, top_p, top_k, min_p, repetition_penalty): what
        the server applies to a request's unset fields (vLLM's --generation-config auto)."""
        return {k: getattr(self, k) for k in _SAMPLING_KEYS if getattr(self, k) is not None}

    def sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's recommended values as defaults and `overrides` on top.

        As in transformers' generate, the checkpoint samples only if it sets do_sample: true; otherwise it
        defaults to greedy (temperature 0). Unlike transformers, no top_k=50 is added when the checkpoint sets
        none (vLLM's behaviour: the checkpoint's values only). max_new_tokens becomes max_tokens."""
        defaults = self.sampling_defaults()
        if not self.do_sample:
            defaults["temperature"] = 0.0
        if self.max_new_tokens is not None:
            defaults["max_tokens"] = self.max_new_tokens
        return SamplingParams(**{**defaults, **overrides})
