"""Token alignment for Prompt-to-Prompt (pure numpy).

Reproduces google/prompt-to-prompt's ``seq_aligner.py`` (``get_replacement_mapper``,
``get_refinement_mapper``) and ``ptp_utils.get_word_inds``, plus the notebooks'
equalizer, with :class:`PromptError` instead of asserts / silent no-ops.

The tokenizer is passed in: any object whose ``encode(text)`` returns ids wrapped in
one bos and one eos (e.g. ``transformers.CLIPTokenizer``) and whose ``decode(ids)``
returns text.  Token positions are indices into that encoding (0 = bos), i.e. into
the 77 columns of a cross-attention map.

Words are ``prompt.split()`` (whitespace, no empty words).  Deliberate differences
from the original:

* a word's tokens are found by encoding each word alone (CLIP's BPE never crosses
  whitespace, so the pieces concatenate to the prompt's encoding); the original's
  character-count heuristic is kept as a fallback when that check fails.  The two
  agree on ordinary prompts; repeated spaces no longer shift words.
* ``replacement_mapper(upstream_tail=False)`` maps the tokens after the last
  swapped word source ``i`` -> target ``j``; the original (the default,
  ``upstream_tail=True``) writes ``mapper[j, j]``, which misaligns everything
  after a swap that changes the token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np

from nti_jax.errors import PromptError

__all__ = [
    "PromptError",
    "align_sequences",
    "check_length",
    "equalizer",
    "refinement_mapper",
    "replacement_mapper",
    "word_token_indices",
]

# Needleman-Wunsch scores of the original (ScoreParams(gap=0, match=1, mismatch=-1)).
MATCH, MISMATCH, GAP = 1, -1, 0
_LEFT, _UP, _DIAG, _STOP = 1, 2, 3, 4  # the original's traceback codes

Word = str | int
WordSpec = Word | Sequence[Word]


# ----------------------------------------------------------------------------- helpers


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text)]


def _char_heuristic_spans(ids: list[int], words: list[str], tokenizer: Any) -> list[tuple[int, int]]:
    """The original ``get_word_inds`` assignment: decoded token lengths fill words."""
    owner = []
    ptr, cur = 0, 0
    for tok in ids[1:-1]:
        owner.append(min(ptr, len(words) - 1))
        cur += len(tokenizer.decode([tok]).strip("#"))
        if ptr < len(words) and cur >= len(words[ptr]):
            ptr, cur = ptr + 1, 0
    spans, start = [], 1
    for k in range(len(words)):
        stop = start + owner.count(k)
        spans.append((start, stop))
        start = stop
    return spans


def _word_spans(prompt: str, tokenizer: Any) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """Words, full ids, and each word's token span ``[start, stop)`` in the ids."""
    words = prompt.split()
    ids = _encode(tokenizer, prompt)
    spans, pos, pieces = [], 1, []
    for w in words:
        inner = _encode(tokenizer, w)[1:-1]
        spans.append((pos, pos + len(inner)))
        pieces.extend(inner)
        pos += len(inner)
    if pieces != ids[1:-1]:  # tokenizer merges across spaces: use the original heuristic
        spans = _char_heuristic_spans(ids, words, tokenizer)
    return words, ids, spans


def _short(prompt: str, limit: int = 120) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 3] + "...")


def _loose(word: str) -> str:
    return word.strip(".,;:!?'\"()[]{}").lower()


def _select_words(prompt: str, words: list[str], word: WordSpec) -> list[int]:
    """Word indices selected by ``word`` (str, int, or a list/tuple of them)."""
    if isinstance(word, (list, tuple)):
        if not word:
            raise PromptError(f"empty word selection for prompt {_short(prompt)}")
        return sorted({k for w in word for k in _select_words(prompt, words, w)})
    if isinstance(word, Integral) and not isinstance(word, bool):
        k = int(word)
        if not -len(words) <= k < len(words):
            raise PromptError(
                f"word index {k} out of range for prompt {_short(prompt)} ({len(words)} words)"
            )
        return [k % len(words)]
    if isinstance(word, str):
        query = word.split()
        if not query:
            raise PromptError(f"empty word {word!r} for prompt {_short(prompt)}")
        n = len(query)
        found = [k for k in range(len(words) - n + 1) if words[k : k + n] == query]
        if not found:
            near = [w for w in words if _loose(w) == _loose(word)]
            hint = f"; did you mean {near[0]!r}?" if near else f"; its words are {words}"
            raise PromptError(f"word {word!r} not found in prompt {_short(prompt)}{hint}")
        return [k + d for k in found for d in range(n)]
    raise PromptError(f"word must be str, int or a list of them, got {type(word).__name__}")


# ----------------------------------------------------------------------------- public API


def check_length(prompt: str, tokenizer: Any, max_len: int = 77) -> int:
    """Number of tokens of ``prompt`` (bos/eos included); PromptError if > ``max_len``."""
    n = len(_encode(tokenizer, prompt))
    if n > max_len:
        raise PromptError(
            f"prompt {_short(prompt)} has {n} tokens including bos/eos, more than max_len={max_len}"
        )
    return n


def word_token_indices(prompt: str, word: WordSpec, tokenizer: Any) -> np.ndarray:
    """Token positions (1-based, after bos) of ``word`` in ``prompt``.

    ``word``: a word of ``prompt.split()`` (every occurrence; several space-separated
    words match that consecutive run), its int index (negative allowed), or a
    list/tuple of these.  A word may span several BPE tokens.
    """
    words, _, spans = _word_spans(prompt, tokenizer)
    ks = _select_words(prompt, words, word)
    out = sorted({p for k in ks for p in range(*spans[k])})
    if not out:
        raise PromptError(f"word {word!r} of prompt {_short(prompt)} has no tokens")
    return np.asarray(out, dtype=np.int64)


def align_sequences(x: Sequence[Any], y: Sequence[Any]) -> np.ndarray:
    """Needleman-Wunsch global alignment of ``y`` to ``x`` exactly as the original.

    Match 1, mismatch -1, gap 0; ties prefer left (gap in ``x``), then up (gap in
    ``y``), then diagonal.  Returns, for each index of ``y``, the aligned index of
    ``x`` or -1 when that element of ``y`` is new.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[_DIAG] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        score[0][j], trace[0][j] = j * GAP, _LEFT
    for i in range(1, n + 1):
        score[i][0], trace[i][0] = i * GAP, _UP
    trace[0][0] = _STOP
    for i in range(1, n + 1):
        row, prev, tr, xi = score[i], score[i - 1], trace[i], x[i - 1]
        for j in range(1, m + 1):
            left = row[j - 1] + GAP
            up = prev[j] + GAP
            diag = prev[j - 1] + (MATCH if xi == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            row[j] = best
            tr[j] = _LEFT if best == left else _UP if best == up else _DIAG
    out = np.full(m, -1, dtype=np.int64)
    i, j = n, m
    while trace[i][j] != _STOP:
        step = trace[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            out[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return out


def _as_list(targets: str | Sequence[str]) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def refinement_mapper(
    source: str, targets: str | Sequence[str], tokenizer: Any, max_len: int = 77
) -> tuple[np.ndarray, np.ndarray]:
    """The original ``get_refinement_mapper`` (words added/removed).

    Returns ``mapper`` int32 (n, max_len): for each target token the aligned source
    token, or -1 for a new token (past the target's eos: the identity), and
    ``alphas`` float32 (n, max_len): 0 where the target token is new, else 1.  Use
    as ``src_attn[..., mapper] * alphas + tgt_attn * (1 - alphas)``.
    """
    check_length(source, tokenizer, max_len)
    x = _encode(tokenizer, source)
    mappers, alphas = [], []
    for target in _as_list(targets):
        check_length(target, tokenizer, max_len)
        y = _encode(tokenizer, target)
        base = align_sequences(x, y)
        mapper = np.arange(max_len, dtype=np.int32)
        mapper[: len(y)] = base
        alpha = np.ones(max_len, dtype=np.float32)
        alpha[: len(y)] = base != -1
        mappers.append(mapper)
        alphas.append(alpha)
    if not mappers:
        return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.float32)
    return np.stack(mappers), np.stack(alphas)


def _replacement_mapper_one(
    source: str, target: str, tokenizer: Any, max_len: int, upstream_tail: bool
) -> np.ndarray:
    wx, _, sx = _word_spans(source, tokenizer)
    wy, _, sy = _word_spans(target, tokenizer)
    if len(wx) != len(wy):
        raise PromptError(
            f"word swap (Replace) needs prompts with the same number of words: "
            f"{_short(source)} has {len(wx)}, {_short(target)} has {len(wy)}; use Refine instead"
        )
    mapper = np.zeros((max_len, max_len), dtype=np.float32)
    swapped = [k for k in range(len(wx)) if wx[k] != wy[k]]
    i = j = 0  # next source / target token to map
    for k in swapped:
        (a, b), (c, d) = sx[k], sy[k]
        if a == b or c == d:
            raise PromptError(
                f"swapped word {wx[k]!r} -> {wy[k]!r} has no tokens in "
                f"{_short(source) if a == b else _short(target)}"
            )
        while i < a:  # unchanged tokens before this word: one to one
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
        if b - a == d - c:
            mapper[np.arange(a, b), np.arange(c, d)] = 1.0
        else:  # token count differs: every source token feeds every target token
            mapper[a:b, c:d] = 1.0 / (d - c)
        i, j = b, d
    while i < max_len and j < max_len:  # rest of the prompt, eos and padding
        if upstream_tail:
            mapper[j, j] = 1.0  # the original's indexing, kept for exact parity
        else:
            mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    if not upstream_tail:  # source longer: last target columns read the last row
        mapper[max_len - 1, j:] = 1.0
    return mapper


def replacement_mapper(
    source: str,
    targets: str | Sequence[str],
    tokenizer: Any,
    max_len: int = 77,
    *,
    upstream_tail: bool = True,
) -> np.ndarray:
    """The original ``get_replacement_mapper`` (word swap), float32 (n, max_len, max_len).

    ``mapper[s, t]`` is the weight of source token ``s`` in target token ``t``
    (``tgt = einsum('...s,st->...t', src, mapper)``).  Words are compared position by
    position; a swapped word with the same token count maps one to one, otherwise
    every source token maps to every target token with weight 1/len(target tokens).
    After the last swap the original maps target ``j`` from source ``j``
    (``upstream_tail=True``, the default); ``False`` maps it from its own source token.
    PromptError if the prompts differ in word count or are too long.
    """
    check_length(source, tokenizer, max_len)
    out = []
    for target in _as_list(targets):
        check_length(target, tokenizer, max_len)
        out.append(_replacement_mapper_one(source, target, tokenizer, max_len, upstream_tail))
    if not out:
        return np.zeros((0, max_len, max_len), np.float32)
    return np.stack(out)


def equalizer(
    prompt: str, weights: dict[Any, float], tokenizer: Any, max_len: int = 77
) -> np.ndarray:
    """Per-token attention factors, float32 (max_len,): ones, with each chosen word's
    tokens set to its factor (keys as in :func:`word_token_indices`)."""
    check_length(prompt, tokenizer, max_len)
    eq = np.ones(max_len, dtype=np.float32)
    for word, factor in weights.items():
        eq[word_token_indices(prompt, word, tokenizer)] = float(factor)
    return eq
