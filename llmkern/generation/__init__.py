"""Text generation pieces: tokenizer and chat templates, incremental detokenization, sampling, stop conditions.

One request, end to end (`model_step` stands for the model's forward returning next-token logits [1, V]):

    tok = Tokenizer.from_pretrained(path)
    defaults = GenerationConfig.from_pretrained(path)
    params = defaults.sampling_params(temperature=0.7, max_tokens=64)  # the checkpoint's defaults, overridden
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    out = OutputStream(tok, params, prompt, eos_token_ids=defaults.eos_token_ids or [tok.eos_token_id])
    generator = make_generator(params)
    while not out.finished:
        token = sample(model_step(...), [params], [prompt], [out.token_ids], [generator])
        delta, finish_reason = out.append(token[0])
        print(delta, end="", flush=True)
"""

from llmkern.generation.tokenizer import Tokenizer  # noqa: F401
from llmkern.generation.detokenizer import IncrementalDetokenizer  # noqa: F401
from llmkern.generation.sampling import (  # noqa: F401
    Logprobs,
    SamplingParams,
    TokenLogprob,
    compute_logprobs,
    make_generator,
    probabilities,
    sample,
    sample_from_probabilities,
    sample_seeds,
    sample_with_probabilities,
)
from llmkern.generation.stop import OutputStream, StopStringMatcher  # noqa: F401
from llmkern.generation.generation_config import GenerationConfig  # noqa: F401
