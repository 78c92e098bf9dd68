"""What a generator is asked for and what it returns: the contract between the generator actors
(``actors/generator.py``) and the rounds of online DPO (``raydpo/online/rounds.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    """How each prompt is sampled. ``temperature`` 0 is greedy."""

    k: int = 2  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # vLLM: prompt i of a call samples with seed + i (independent of batching); transformers:
    # batch b of a call with seed + b. Either way the same call samples the same.
    seed: int = 0


@dataclass
class Samples:
    """The k completions of one prompt (token ids, EOS included where it was generated), each
    with its summed log-prob under the generating policy (temperature 1, no top_p: the model's
    own distribution), and that policy's version."""

    completions: list[list[int]]
    logps: list[float]
    version: int
    finished: list[bool] = field(default_factory=list)  # ended with EOS (not cut at max_new_tokens)
