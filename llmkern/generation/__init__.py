"""Text generation pieces: tokenizer and chat templates, incremental detokenization, sampling, stop conditions."""

from llmkern.generation.tokenizer import Tokenizer  # noqa: F401
from llmkern.generation.detokenizer import IncrementalDetokenizer  # noqa: F401
from llmkern.generation.sampling import (  # noqa: F401
    Logprobs,
    SamplingParams,
    compute_logprobs,
    make_generator,
    probabilities,
    sample,
    sample_from_probabilities,
)
from llmkern.generation.stop import OutputStream, StopStringMatcher  # noqa: F401
from llmkern.generation.generation_config import GenerationConfig  # noqa: F401
