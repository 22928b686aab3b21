"""Hand-worked checks of nti_jax.core.seq_aligner with the real CLIP BPE tokenizer.

Token ids used below (CLIP BPE, checked in ``test_tokenization_assumptions``):
bos 49406, eos 49407, "a" 320, "cat" 2368, "black" 1449; every plain English word
used here is one token except "hippopotamus" -> "hippo" "potam" "us" (3 tokens).
Positions are indices into ``tokenizer.encode(prompt)``; 0 is bos.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zipfile

import numpy as np
import pytest

from nti_jax.core.seq_aligner import (
    PromptError,
    align_sequences,
    check_length,
    equalizer,
    refinement_mapper,
    replacement_mapper,
    word_token_indices,
)

TOK_DIR = os.path.join(os.path.dirname(__file__), "..", "nti_jax", "toy", "model", "tokenizer")
L = 77


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _build_tokenizer_dir(out: str) -> str:
    """Fallback: CLIP vocab from clip-anytorch's bpe gz, as OpenAI's SimpleTokenizer builds it."""
    gz = os.environ.get("NTI_CLIP_BPE_GZ")
    if not gz:
        wheels = glob.glob("/tmp/cw/clip_anytorch-*.whl")
        if not wheels:
            pytest.skip("no CLIP tokenizer folder and no clip-anytorch wheel in /tmp/cw")
        with zipfile.ZipFile(wheels[0]) as z:
            gz = z.extract("clip/bpe_simple_vocab_16e6.txt.gz", out)
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = TOK_DIR
    if not os.path.isfile(os.path.join(TOK_DIR, "vocab.json")):
        path = _build_tokenizer_dir(str(tmp_path_factory.mktemp("clip_tok")))
    return transformers.CLIPTokenizer.from_pretrained(path)


def test_tokenization_assumptions(tok):
    assert tok.encode("a cat") == [49406, 320, 2368, 49407]
    assert tok.encode("a black cat") == [49406, 320, 1449, 2368, 49407]
    ids = tok.encode("hippopotamus")
    assert len(ids) == 5  # bos + 3 BPE pieces + eos
    assert "".join(tok.decode([i]) for i in ids[1:-1]) == "hippopotamus"
    for w in ["dog", "red", "blue", "sitting", "on", "mat", "photo", "of"]:
        assert len(tok.encode(w)) == 3, w


# ----------------------------------------------------------------------------- word indices

P = "a photo of a hippopotamus sitting"
# tokens: 0 bos | 1 a | 2 photo | 3 of | 4 a | 5 hippo 6 potam 7 us | 8 sitting | 9 eos


@pytest.mark.parametrize(
    "word, expected",
    [
        ("hippopotamus", [5, 6, 7]),  # one word, three BPE tokens
        ("sitting", [8]),
        ("a", [1, 4]),  # every occurrence, like the original
        (4, [5, 6, 7]),  # word index
        (-1, [8]),
        (["photo", 5], [2, 8]),
        ("photo of", [2, 3]),  # consecutive words
    ],
)
def test_word_token_indices(tok, word, expected):
    np.testing.assert_array_equal(word_token_indices(P, word, tok), expected)


def test_word_token_indices_punctuation_and_spaces(tok):
    # "a cat." -> bos a cat . eos ; the word "cat." owns tokens 2 and 3
    np.testing.assert_array_equal(word_token_indices("a cat.", "cat.", tok), [2, 3])
    # repeated spaces do not create empty words (original: would shift the words)
    np.testing.assert_array_equal(word_token_indices("a  black cat", "cat", tok), [3])
    np.testing.assert_array_equal(word_token_indices("a  black cat", 2, tok), [3])


def test_word_token_indices_fallback_heuristic(tok):
    """If per-word encodings don't concatenate to the prompt's, the original's
    character-count rule is used; on CLIP it gives the same answer."""

    class Flaky:  # per-word encodes get a junk token, so the fast path must be rejected
        def encode(self, text):
            ids = tok.encode(text)
            return ids if " " in text else ids[:-1] + [999, ids[-1]]

        def decode(self, ids):
            return tok.decode(ids)

    for word, expected in [("hippopotamus", [5, 6, 7]), ("sitting", [8]), (0, [1])]:
        np.testing.assert_array_equal(word_token_indices(P, word, Flaky()), expected)


def test_unknown_word_errors(tok):
    with pytest.raises(PromptError, match=r"'dog'.*'a photo of a hippopotamus sitting'") as e:
        word_token_indices(P, "dog", tok)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(PromptError, match="did you mean 'cat.'"):
        word_token_indices("a cat.", "cat", tok)
    with pytest.raises(PromptError, match="out of range"):
        word_token_indices(P, 6, tok)
    with pytest.raises(PromptError):
        word_token_indices(P, ["photo", "dog"], tok)


# ----------------------------------------------------------------------------- Needleman-Wunsch


def test_align_sequences_hand_derived():
    # x=[1,2], y=[2,1].  Score rows (i=0..2, j=0..2): [0,0,0] [0,0,1] [0,1,1].
    # (2,2): left=1, up=1, diag=-1 -> left (ties prefer left) -> y[1] new;
    # (2,1): diag (x[1]==y[0]) -> y[0]->x[1]; (1,0): up; stop.
    np.testing.assert_array_equal(align_sequences([1, 2], [2, 1]), [1, -1])
    # x=[5], y=[5,1,5]: row 1 = [0,1,1,1]; (1,3): left=1 ties diag=1 -> left, (1,2): left,
    # (1,1): diag.  The FIRST 5 of y is aligned, the later one is "new".
    np.testing.assert_array_equal(align_sequences([5], [5, 1, 5]), [0, -1, -1])
    # x=[5,1,5], y=[5]: column 1 = [0,1,1,1]; (3,1): left=0, up=1, diag=1 -> up,
    # (2,1): up, (1,1): diag -> y[0]->x[0].
    np.testing.assert_array_equal(align_sequences([5, 1, 5], [5]), [0])
    np.testing.assert_array_equal(align_sequences([7, 8, 9], [7, 8, 9]), [0, 1, 2])
    np.testing.assert_array_equal(align_sequences([], [3, 4]), [-1, -1])
    assert align_sequences([3], []).shape == (0,)


# ----------------------------------------------------------------------------- refinement


def _tail_ok(mapper, alphas, n_target_tokens):
    np.testing.assert_array_equal(mapper[n_target_tokens:], np.arange(n_target_tokens, L))
    np.testing.assert_array_equal(alphas[n_target_tokens:], 1.0)


def test_refinement_insertion(tok):
    # x = B a cat E ; y = B a black cat E.  NW scores (rows x, cols y):
    #   B: 0 1 1 1 1 1 | a: 0 1 2 2 2 2 | cat: 0 1 2 2 3 3 | E: 0 1 2 2 3 4
    # traceback from (4,5): diag E->E, diag cat->cat, (2,3) left: "black" new,
    # diag a->a, diag B->B.
    mapper, alphas = refinement_mapper("a cat", ["a black cat"], tok)
    assert mapper.shape == alphas.shape == (1, L)
    assert mapper.dtype.kind == "i" and alphas.dtype == np.float32
    np.testing.assert_array_equal(mapper[0, :5], [0, 1, -1, 2, 3])
    np.testing.assert_array_equal(alphas[0, :5], [1, 1, 0, 1, 1])
    _tail_ok(mapper[0], alphas[0], 5)


def test_refinement_deletion(tok):
    # x = B a black cat E ; y = B a cat E.  Rows:
    #   B: 0 1 1 1 1 | a: 0 1 2 2 2 | black: 0 1 2 2 2 | cat: 0 1 2 3 3 | E: 0 1 2 3 4
    # traceback: diag E->4, diag cat->3, (3,2) up: "black" dropped, diag a->1, diag B->0.
    mapper, alphas = refinement_mapper("a black cat", "a cat", tok)
    np.testing.assert_array_equal(mapper[0, :4], [0, 1, 3, 4])
    np.testing.assert_array_equal(alphas[0], np.ones(L))
    _tail_ok(mapper[0], alphas[0], 4)  # i.e. mapper[4:] = 4, 5, ..., 76


def test_refinement_substitution(tok):
    # x = B a cat E ; y = B a dog E.  Rows:
    #   B: 0 1 1 1 1 | a: 0 1 2 2 2 | cat: 0 1 2 2 2 | E: 0 1 2 2 3
    # (4,4) diag E->3; (3,3) left ties diag-1: "dog" new; (3,2) up drops "cat"; diag, diag.
    mapper, alphas = refinement_mapper("a cat", ["a dog"], tok)
    np.testing.assert_array_equal(mapper[0, :4], [0, 1, -1, 3])
    np.testing.assert_array_equal(alphas[0, :4], [1, 1, 0, 1])


def test_refinement_multitoken_insertion_and_batch(tok):
    # y = B a hippo potam us cat E: the three new pieces are all new (left moves).
    mapper, alphas = refinement_mapper("a cat", ["a hippopotamus cat", "a cat"], tok)
    assert mapper.shape == (2, L)
    np.testing.assert_array_equal(mapper[0, :7], [0, 1, -1, -1, -1, 2, 3])
    np.testing.assert_array_equal(alphas[0, :7], [1, 1, 0, 0, 0, 1, 1])
    _tail_ok(mapper[0], alphas[0], 7)
    np.testing.assert_array_equal(mapper[1], np.arange(L))  # identical prompt: identity
    np.testing.assert_array_equal(alphas[1], np.ones(L))


def test_refinement_from_null_text(tok):
    # x = B E ; y = B a cat E: rows B: 0 1 1 1 1 | E: 0 1 1 1 2 -> [0, -1, -1, 1]
    mapper, alphas = refinement_mapper("", ["a cat"], tok)
    np.testing.assert_array_equal(mapper[0, :4], [0, -1, -1, 1])
    np.testing.assert_array_equal(alphas[0, :4], [1, 0, 0, 1])


# ----------------------------------------------------------------------------- replacement


def test_replacement_same_token_count_is_identity(tok):
    m = replacement_mapper("a cat sitting on a mat", ["a dog sitting on a mat"], tok)
    assert m.shape == (1, L, L) and m.dtype == np.float32
    np.testing.assert_array_equal(m[0], np.eye(L, dtype=np.float32))


def test_replacement_two_swaps_one_to_one(tok):
    # red->blue and cat->dog: every word one token, so still the identity
    m = replacement_mapper("a red cat", ["a blue dog", "a red cat"], tok)
    np.testing.assert_array_equal(m, np.broadcast_to(np.eye(L, dtype=np.float32), (2, L, L)))


def test_replacement_longer_word(tok):
    # source B a cat sitting E      -> positions 0 1 2 3 4
    # target B a hippo potam us sitting E -> 0 1 2 3 4 5 6
    m = replacement_mapper("a cat sitting", ["a hippopotamus sitting"], tok, upstream_tail=False)[0]
    expected = np.zeros((L, L), np.float32)
    expected[0, 0] = expected[1, 1] = 1  # bos, "a"
    expected[2, 2:5] = 1 / 3  # cat feeds each hippopotamus piece with weight 1/3
    for t in range(L - 5):  # sitting, eos, padding: source 3+t -> target 5+t
        expected[3 + t, 5 + t] = 1
    np.testing.assert_allclose(m, expected)
    np.testing.assert_allclose(m.sum(0)[5:], 1)  # every later target token has one source


def test_replacement_longer_word_upstream_tail(tok):
    # the original writes mapper[j, j] after the last swap: target "sitting" (5)
    # reads source position 5 (padding) instead of source "sitting" (3).
    m = replacement_mapper("a cat sitting", ["a hippopotamus sitting"], tok)[0]  # the default
    expected = np.zeros((L, L), np.float32)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:5] = 1 / 3
    for j in range(5, L):
        expected[j, j] = 1
    np.testing.assert_allclose(m, expected)


def test_replacement_shorter_word(tok):
    # source B a hippo potam us sitting E ; target B a cat sitting E
    m = replacement_mapper("a hippopotamus sitting", ["a cat sitting"], tok, upstream_tail=False)[0]
    expected = np.zeros((L, L), np.float32)
    expected[0, 0] = expected[1, 1] = 1
    expected[2:5, 2] = 1.0  # ratio 1/len(target tokens) = 1: the three pieces are summed
    for t in range(L - 5):  # source 5+t -> target 3+t while source < 77
        expected[5 + t, 3 + t] = 1
    expected[L - 1, L - 2 :] = 1  # last two target padding columns read the last source row
    np.testing.assert_allclose(m, expected)


def test_replacement_unchanged_words_before_swap_follow_shift(tok):
    # "a hippopotamus on a cat" -> "a rhinoceros on a dog": both animals 3 tokens,
    # then cat->dog; everything one to one -> identity.
    assert len(tok.encode("rhinoceros")) == 5
    m = replacement_mapper("a hippopotamus on a cat", ["a rhinoceros on a dog"], tok)[0]
    np.testing.assert_array_equal(m, np.eye(L))
    # 1-token -> 3-token swap BEFORE another swap: the middle word is shifted by 2
    # source B a cat on a cat E ; target B a hippo potam us on a dog E
    m = replacement_mapper("a cat on a cat", ["a hippopotamus on a dog"], tok, upstream_tail=False)[0]
    assert m[3, 5] == 1 and m[4, 6] == 1 and m[5, 7] == 1 and m[6, 8] == 1
    np.testing.assert_allclose(m[2, 2:5], 1 / 3)
    # the original (default): the same up to the last swap, then target eos 8 reads source 8 (padding)
    m = replacement_mapper("a cat on a cat", ["a hippopotamus on a dog"], tok)[0]
    assert m[3, 5] == 1 and m[4, 6] == 1 and m[5, 7] == 1 and m[8, 8] == 1 and m[6].sum() == 0


def test_replacement_word_count_mismatch(tok):
    with pytest.raises(PromptError, match=r"'a cat' has 2, 'a black cat' has 3") as e:
        replacement_mapper("a cat", ["a black cat"], tok)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- equalizer & length


def test_equalizer(tok):
    eq = equalizer(P, {"hippopotamus": 2.0, "sitting": 0.5, 1: 3.0}, tok)
    expected = np.ones(L, np.float32)
    expected[5:8] = 2.0
    expected[8] = 0.5
    expected[2] = 3.0  # word 1 = "photo"
    assert eq.dtype == np.float32 and eq.shape == (L,)
    np.testing.assert_array_equal(eq, expected)
    np.testing.assert_array_equal(equalizer(P, {}, tok), np.ones(L))
    with pytest.raises(PromptError, match="'zebra'"):
        equalizer(P, {"zebra": 2.0}, tok)


def test_check_length(tok):
    assert check_length("", tok) == 2  # null text is fine
    assert check_length(" ".join(["a"] * 75), tok) == 77
    long = " ".join(["a"] * 76)
    with pytest.raises(PromptError, match=r"78 tokens.*max_len=77") as e:
        check_length(long, tok)
    assert "\n" not in str(e.value) and "'a a a" in str(e.value)
    with pytest.raises(PromptError):
        refinement_mapper("a cat", [long], tok)
    with pytest.raises(PromptError):
        replacement_mapper(long, [long.replace("a", "b", 1)], tok)
    with pytest.raises(PromptError):
        equalizer(long, {"a": 2.0}, tok)
    # smaller max_len is honoured everywhere
    with pytest.raises(PromptError):
        refinement_mapper("a cat", ["a black cat"], tok, max_len=4)
