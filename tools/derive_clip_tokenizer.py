"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's bundled BPE list.

Why: the training CLI must work offline, and the only tokenizer data we may redistribute without a Hub download
is `open_clip/bpe_simple_vocab_16e6.txt.gz` (MIT), shipped in the `open-clip-torch` wheel on PyPI. The vocabulary
is built exactly as OpenAI's CLIP `SimpleTokenizer` does: the 256 byte symbols of `bytes_to_unicode`, the same
with `</w>`, one token per merge (merge lines 1..48894, skipping the header), then `<|startoftext|>` and
`<|endoftext|>` -> 49,408 entries.

Usage (reproducible; with no input given it runs `pip download` for the pinned wheel):
    python tools/derive_clip_tokenizer.py [--bpe PATH.txt.gz | --wheel PATH.whl] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget minus byte symbols and the two special tokens
VOCAB_SIZE = 49408
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "library" / "models" / "tokenizer" / "clip"

LICENSE_NOTE = """\
The files vocab.json and merges.txt in this folder are derived by tools/derive_clip_tokenizer.py from
open_clip/bpe_simple_vocab_16e6.txt.gz in the open-clip-torch 3.3.0 wheel (sha256 {sha}).
That file is distributed under the MIT licence below.

Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave,
Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE.
"""

SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character map (so BPE never sees whitespace/control bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def derive(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merge lines) built with CLIP's construction."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"expected {NUM_MERGES} two-symbol merge lines after the header")
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[str], sha: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **SPECIAL_TOKENS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8"
    )
    (out / "LICENSE").write_text(LICENSE_NOTE.format(sha=sha), encoding="utf-8")


def read_bpe(bpe: Path | None, wheel: Path | None) -> bytes:
    if bpe is not None:
        return bpe.read_bytes()
    if wheel is None:
        tmp = Path(tempfile.mkdtemp(prefix="open_clip_"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", OPEN_CLIP_REQUIREMENT, "-d", str(tmp)]
        subprocess.run(cmd, check=True)
        wheel = next(tmp.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(BPE_MEMBER)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    source.add_argument("--wheel", type=Path, help=f"{OPEN_CLIP_REQUIREMENT} wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = read_bpe(args.bpe, args.wheel)
    sha = hashlib.sha256(data).hexdigest()
    if sha != BPE_SHA256:
        print(
            f"error: BPE file sha256 {sha} != expected {BPE_SHA256} ({OPEN_CLIP_REQUIREMENT})",
            file=sys.stderr,
        )
        return 2
    vocab, merges = derive(data)
    write_tokenizer(args.out, vocab, merges, sha)
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
