"""Sampling completions from a language model with the C++ sampler (``_C.sample``).

Temperature, top-k, top-p, min-p and threshold sampling (Zur et al.'s mitigation: tokens under a
probability are dropped), stop tokens, batches with left padding, the model's KV cache when it
has one. Seeded per prompt: prompt ``i``'s completion depends only on (seed, i, prompt, model),
not on ``batch_size`` nor on the other prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

from . import _C

__all__ = ["SamplerConfig", "Samples", "sample"]


@dataclass
class SamplerConfig:
    """How to sample. Filters act in the order temperature -> threshold -> top_k -> top_p ->
    min_p, each on the renormalized result of the previous; the most probable token always
    survives. ``temperature=0`` is greedy decoding.

    ``stop_tokens`` end a completion (the stop token is included in it); ``pad_id`` fills the
    left padding (it is masked, so any valid id works).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    threshold: float = 0.0
    stop_tokens: List[int] = field(default_factory=list)
    max_new_tokens: int = 32
    pad_id: int = 0
    batch_size: int = 32
    seed: int = 0
    use_cache: bool = True

    def native(self) -> "_C.SamplerConfig":
        """The C++ config (validated: ValueError naming the field)."""
        return _C.SamplerConfig(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            threshold=self.threshold, stop_tokens=list(self.stop_tokens),
            max_new_tokens=self.max_new_tokens, pad_id=self.pad_id, batch_size=self.batch_size,
            seed=self.seed, use_cache=self.use_cache)


@dataclass
class Samples:
    """Completions, one entry per prompt in order.

    ``tokens[i]``: the completion's token ids (without the prompt; the stop token included when
    one ended it). ``stop_reasons[i]``: ``"stop_token"`` or ``"max_tokens"``. ``logprobs[i][t]``:
    log p of ``tokens[i][t]`` under the unmodified model (temperature 1, no filter).
    ``texts[i]``: the decoded completion (without the stop token) when a tokenizer was given.
    """

    tokens: List[List[int]]
    stop_reasons: List[str]
    logprobs: List[List[float]]
    texts: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.tokens)


Prompt = Union[str, Sequence[int]]


def sample(model: Any, prompts: Sequence[Prompt], config: Optional[SamplerConfig] = None,
           tokenizer: Any = None) -> Samples:
    """Samples a completion for each prompt.

    ``model``: a biastransfer Model or a ``torch.nn.Module`` (wrapped with
    :func:`biastransfer.modeling.wrap`). ``prompts``: token-id lists, or strings when a
    ``tokenizer`` (a :class:`biastransfer.Tokenizer`) is given; with a tokenizer the texts are
    decoded too. Returns :class:`Samples`.
    """
    config = config or SamplerConfig()
    ids: List[List[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise TypeError(f"prompts[{i}]: a string prompt needs a tokenizer")
            ids.append(list(tokenizer.encode(prompt)))
        else:
            ids.append([int(t) for t in prompt])
    result = _C.sample(model, ids, config.native())
    texts = None
    if tokenizer is not None:
        stops = set(config.stop_tokens)
        texts = [
            tokenizer.decode(t[:-1] if reason == "stop_token" and t and t[-1] in stops else t)
            for t, reason in zip(result["tokens"], result["stop_reasons"])
        ]
    return Samples(tokens=result["tokens"], stop_reasons=result["stop_reasons"],
                   logprobs=result["logprobs"], texts=texts)
