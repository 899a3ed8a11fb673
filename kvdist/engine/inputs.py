"""What `LLM.generate` accepts, checked: prompts, sampling parameters and cache salts.

Every rank runs these checks on the same arguments and reaches the same verdict: a prompt
that fails gets an output with finish_reason "error" on every rank, and the others are
served. The checks name what is wrong (which token, which limit, which setting to change).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvdist.engine.model.tokenizer import Tokenizer
from kvdist.engine.sampling import SamplingParams

Prompt = str | list[int]


@dataclass(frozen=True)
class Limits:
    """What a prompt and its answer must fit: the vocabulary, the context, the KV cache."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int


def prompt_list(prompts: Any) -> list[Any]:
    """`generate`'s prompts as a list: one prompt (a str, or a flat sequence of token ids:
    a list, tuple, 1-D array or tensor) or a sequence of them (none: no prompts). A list
    with neither a prompt nor a number in it (`[None, None]`) is a TypeError: one prompt of
    bad ids, or several bad prompts, it cannot tell how many prompts were meant."""
    prompts = as_python(prompts)
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and not any(map(_prompt_like, prompts)):
        # Flat: one prompt of ids, whose checks name a bad one ([1, 2.5]: "token 1 is 2.5")
        if any(map(_number_like, prompts)):
            return [prompts]
        item = prompts[0]
        raise TypeError(
            f"prompts must be a str, a list of token ids, or a list of them; prompts[0] is "
            f"{item!r} ({type(item).__name__}), and no item is a token id or a prompt"
        )
    if isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of them, "
                        f"got {type(prompts).__name__}")  # fmt: skip
    return list(prompts)


def _prompt_like(x: Any) -> bool:
    return isinstance(x, (str, bytes)) or (hasattr(x, "__iter__") and not _scalar(x))


def _number_like(x: Any) -> bool:
    """A token id, or a number that is a bad one (2.5, True): what a flat prompt holds."""
    return isinstance(x, numbers.Number) or _scalar(x) or hasattr(type(x), "__index__")


def _scalar(x: Any) -> bool:
    """A 0-d tensor or numpy array (`list(tensor)` gives these): one token id, though it
    has `__iter__`."""
    return (isinstance(x, torch.Tensor) or type(x).__module__ == "numpy") and (
        getattr(x, "ndim", None) == 0
    )


def params_for(params: Any, n: int) -> list[SamplingParams]:
    """One `SamplingParams` per prompt, from None (the defaults), one for all, or a list."""
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(
            "sampling_params must be a SamplingParams or a list of them (one per "
            f"prompt), got {type(params).__name__}"
        )
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params


def salts_for(cache_salt: Any, n: int) -> list[str | None]:
    """One cache salt per prompt, from None, one str for all, or a list."""
    if cache_salt is None or isinstance(cache_salt, str):
        return [cache_salt] * n
    if not isinstance(cache_salt, (list, tuple)):
        raise TypeError(
            "cache_salt must be a str, None, or a list of them (one per prompt), got "
            f"{type(cache_salt).__name__}"
        )
    if len(cache_salt) != n:
        raise ValueError(f"got {len(cache_salt)} cache salts for {n} prompts")
    bad = next((x for x in cache_salt if x is not None and not isinstance(x, str)), None)
    if bad is not None:
        raise TypeError(f"a cache_salt must be a str or None, got {bad!r}")
    return list(cache_salt)


def check_prompt(
    prompt: Any, params: Any, tokenizer: Tokenizer | None, limits: Limits
) -> tuple[list[int], SamplingParams | None, str | None]:
    """`(token ids, params with plain numbers, None)` for a prompt that can be served, else
    `(token ids or [], None, why not)`."""
    tokens, error = _tokenize(prompt, tokenizer)
    if error is None:
        error = _validate(tokens, params, limits)
    if error is not None:
        return tokens, None, error
    return tokens, _plain_numbers(params), None


def params_key(p: SamplingParams) -> tuple[Any, ...]:
    """Validated sampling params as plain values, the same bytes on every rank."""
    stops = tuple(int(t) for t in p.stop_token_ids)
    return (p.max_tokens, p.temperature, p.top_p, p.seed, p.ignore_eos, stops)


def as_python(x: Any) -> Any:
    """A tensor or numpy array (or scalar) as Python lists and numbers; anything else as is."""
    if isinstance(x, torch.Tensor) or type(x).__module__ == "numpy":
        return x.tolist()
    return x


def _tokenize(prompt: Any, tokenizer: Tokenizer | None) -> tuple[list[int], str | None]:
    if isinstance(prompt, str):
        if tokenizer is None:
            return [], "this model has no tokenizer: pass prompts as lists of token ids"
        return list(tokenizer.encode(prompt)), None
    prompt = as_python(prompt)
    if not isinstance(prompt, (list, tuple)):
        return [], f"a prompt must be a str or a list of ints, got {type(prompt).__name__}"
    tokens = []
    for i, t in enumerate(prompt):
        t = as_python(t)  # a 0-d tensor of bools indexes as 0 or 1: its value is a bool
        try:
            if isinstance(t, bool):
                raise TypeError
            tokens.append(operator.index(t))  # int, or a numpy integer
        except TypeError:
            return [], f"prompt token {i} is {t!r} ({type(t).__name__}), not an int"
    return tokens, None


def _validate(tokens: Sequence[int], params: Any, limits: Limits) -> str | None:
    if not isinstance(params, SamplingParams):
        return f"sampling params must be a SamplingParams, got {type(params).__name__}"
    try:
        params.validate()
    except ValueError as exc:
        return str(exc)
    if not tokens:
        return "empty prompt"
    bad = next((t for t in tokens if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        return f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})"
    if len(tokens) >= limits.max_model_len:
        return (
            f"prompt of {len(tokens)} tokens does not fit the model's context of "
            f"{limits.max_model_len} tokens (at least one must be generated)"
        )
    # Alone in the cache it must fit, prompt and answer, or it would wait forever (the
    # last token sampled is never computed: it takes no KV slot).
    need = min(len(tokens) + params.max_tokens, limits.max_model_len) - 1
    blocks = -(-need // limits.block_size)
    if blocks > limits.num_blocks:
        return (
            f"{len(tokens)} prompt tokens and up to {params.max_tokens} new ones need "
            f"{blocks} KV blocks of {limits.block_size} tokens; the cache has "
            f"{limits.num_blocks} (raise num_blocks or lower max_tokens)"
        )
    return None


def _plain_numbers(params: SamplingParams) -> SamplingParams:
    """`params` (validated) with Python floats and ints: a Fraction or a numpy scalar
    passes the checks, but the sampler and the call's digest want plain numbers."""
    return replace(
        params,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        max_tokens=int(params.max_tokens),
        seed=None if params.seed is None else int(params.seed),
        stop_token_ids=[int(t) for t in params.stop_token_ids],
    )
