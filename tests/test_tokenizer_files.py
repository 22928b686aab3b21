"""The shipped CLIP tokenizer folder (nti_jax/toy/model/tokenizer/) is the real CLIP BPE.

Provenance of EXPECTED_IDS: obtained once by running OpenAI's original
``clip/simple_tokenizer.py`` (``SimpleTokenizer().encode(text)``) from the
``clip-anytorch`` 2.6.0 wheel (``pip download --no-deps clip-anytorch``), with
its own ``bpe_simple_vocab_16e6.txt.gz``, ``ftfy`` 6.3.1 and ``regex``.
SimpleTokenizer.encode adds no special tokens; the HF tokenizer wraps the ids
in <|startoftext|> (49406) ... <|endoftext|> (49407).
"""

import json
import os

import pytest

from nti_jax.toy.tokenizer import BOS, EOS, N_MERGES, VOCAB_SIZE, bytes_to_unicode

TOK_DIR = os.path.join(os.path.dirname(__file__), "..", "nti_jax", "toy", "model", "tokenizer")

BOS_ID, EOS_ID = 49406, 49407

EXPECTED_IDS = {
    "a red circle on a blue background": [320, 736, 7117, 525, 320, 1746, 5994],
    "red green blue yellow purple orange white black gray": [
        736, 1901, 1746, 4481, 5496, 4287, 1579, 1449, 7048,
    ],
    "circle square triangle": [7117, 3999, 14615],
    "a black triangle on a white background": [320, 1449, 14615, 525, 320, 1579, 5994],
    "A Purple SQUARE on a GrAy Background": [320, 5496, 3999, 525, 320, 7048, 5994],
    "Hello, world! It's a test: (shapes) & colours; 3.14 - ok?": [
        3306, 267, 1002, 256, 585, 568, 320, 1628, 281, 263, 15377, 264, 261,
        7626, 282, 274, 269, 272, 275, 268, 2481, 286,
    ],
    "an orange   circle\ton a\nyellow background.": [550, 4287, 7117, 525, 320, 4481, 5994, 269],
    (
        "a photograph of an astronaut riding a horse on the moon, highly detailed, "
        "trending on artstation, with dramatic lighting and a beautiful sunset over "
        "the distant mountains"
    ): [
        320, 8853, 539, 550, 18376, 6765, 320, 4558, 525, 518, 3293, 267, 5302,
        12609, 267, 6087, 525, 1486, 2631, 267, 593, 11240, 5799, 537, 320, 1215,
        3424, 962, 518, 18949, 5873,
    ],
    "don't we're they'll I'm you've he'd": [847, 713, 649, 982, 889, 1342, 328, 880, 592, 1200, 797, 1896],
    "": [],
}


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(TOK_DIR)


def test_files_present():
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(TOK_DIR, name)), name


def test_vocab_and_merges_layout():
    with open(os.path.join(TOK_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(TOK_DIR, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split()) for line in lines[1:] if line]
    assert len(merges) == N_MERGES == 48894
    assert all(len(m) == 2 for m in merges)

    assert len(vocab) == VOCAB_SIZE == 49408
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    chars = list(bytes_to_unicode().values())
    for i, c in enumerate(chars):
        assert vocab[c] == i
        assert vocab[c + "</w>"] == 256 + i
    for i, (a, b) in enumerate(merges):
        assert vocab[a + b] == 512 + i
    assert vocab[BOS] == BOS_ID and vocab[EOS] == EOS_ID


def test_special_tokens_and_size(tok):
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token == BOS and tok.bos_token_id == BOS_ID
    assert tok.eos_token == EOS and tok.eos_token_id == EOS_ID
    assert tok.pad_token == EOS and tok.pad_token_id == EOS_ID
    assert tok.unk_token == EOS


@pytest.mark.parametrize("text", list(EXPECTED_IDS))
def test_ids_match_openai_simple_tokenizer(tok, text):
    assert tok(text)["input_ids"] == [BOS_ID] + EXPECTED_IDS[text] + [EOS_ID]


def test_pad_to_77(tok):
    text = "a red circle on a blue background"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)["input_ids"]
    n = len(EXPECTED_IDS[text])
    assert len(ids) == 77
    assert ids[0] == BOS_ID
    assert ids[1 : 1 + n] == EXPECTED_IDS[text]
    assert all(i == EOS_ID for i in ids[1 + n :])


def test_truncation_keeps_eos(tok):
    ids = tok("a red circle " * 40, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids) == 77
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:76] == ([320, 736, 7117] * 25)


def test_batch_and_decode(tok):
    out = tok(["a green square on a black background", "a white triangle on a orange background"],
              padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert [len(x) for x in out] == [77, 77]
    assert tok.decode(out[0], skip_special_tokens=True) == "a green square on a black background"
