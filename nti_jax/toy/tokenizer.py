"""Write OpenAI CLIP's BPE vocabulary as a ``transformers.CLIPTokenizer`` folder.

The source is ``bpe_simple_vocab_16e6.txt.gz`` as shipped in OpenAI's ``clip``
package (e.g. inside the ``clip-anytorch`` wheel).  The vocabulary is built
exactly like ``clip/simple_tokenizer.py``'s ``SimpleTokenizer``:

1. the 256 ``bytes_to_unicode`` characters,
2. the same 256 characters with ``</w>`` appended,
3. the 48894 merges (lines ``1 .. 49152-256-2`` of the gz file) joined,
4. ``<|startoftext|>`` and ``<|endoftext|>``,

for 49408 entries in total.  The resulting folder matches the layout of
Stable Diffusion 1.x's ``tokenizer/`` folder (``vocab.json``, ``merges.txt``,
``special_tokens_map.json``, ``tokenizer_config.json``).

Usage::

    python -m nti_jax.toy.tokenizer path/to/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import os
import sys

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
N_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer
VOCAB_SIZE = 256 * 2 + N_MERGES + 2  # 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_merges(bpe_gz_path: str) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..48894 of the gz file (line 0 is a header)."""
    with gzip.open(bpe_gz_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_gz_path}: unexpected merges file layout")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in exactly SimpleTokenizer's order."""
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend([BOS, EOS])
    encoder = dict(zip(vocab, range(len(vocab))))
    if len(encoder) != len(vocab):
        raise ValueError("duplicate tokens in vocabulary")
    return encoder


def write_clip_tokenizer(bpe_gz_path: str, out_dir: str) -> str:
    """Write a ``CLIPTokenizer.from_pretrained``-loadable folder; returns ``out_dir``."""
    merges = read_merges(bpe_gz_path)
    vocab = build_vocab(merges)
    os.makedirs(out_dir, exist_ok=True)

    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(f"{a} {b}" for a, b in merges))
        f.write("\n")

    def special(tok: str) -> dict:
        return {
            "content": tok,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    special_map = {
        "bos_token": special(BOS),
        "eos_token": special(EOS),
        "pad_token": EOS,
        "unk_token": special(EOS),
    }
    config = {
        "add_prefix_space": False,
        "bos_token": special(BOS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": special(EOS),
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(EOS),
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m nti_jax.toy.tokenizer BPE_GZ OUT_DIR", file=sys.stderr)
        return 2
    out = write_clip_tokenizer(argv[0], argv[1])
    print(f"wrote CLIP tokenizer ({VOCAB_SIZE} tokens) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
