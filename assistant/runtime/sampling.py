"""How the next token is chosen: llama.cpp's sampler chain, built from one answer's settings.

Each sequence has its own chain (its own seed, grammar and repeat window), so answers decoded together
sample exactly as they would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

from assistant.runtime.errors import ModelError


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's samplers for one answer (temperature <= 0: greedy). `grammar` (GBNF, root rule `root`)
    constrains what may be sampled, e.g. to JSON; the end of the turn is then allowed only where the
    grammar is complete."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    grammar: str | None = None


def sampler_chain(vocab, n_vocab: int, params: SamplingParams):
    """A llama.cpp sampler chain (grammar first, then penalties, top-k, top-p, min-p, temperature);
    the caller frees it (llama_sampler_free)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if params.grammar is not None:
        constraint = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not constraint:
            llama_cpp.llama_sampler_free(chain)
            raise ModelError("the grammar does not parse (llama.cpp refused it)")
        add(constraint)
    if params.repeat_penalty != 1.0:
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
    if params.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    add(llama_cpp.llama_sampler_init_dist(params.seed if params.seed is not None else 0xFFFFFFFF))
    return chain
