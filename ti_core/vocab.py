"""The CLIP BPE tokenizer, built offline from the vocabulary file that PyPI packages ship.

Stable Diffusion's text encoders (CLIP ViT-L for SD1, OpenCLIP ViT-H for SD2, both for SDXL) all use
OpenAI's 49408-token BPE vocabulary. The file ``bpe_simple_vocab_16e6.txt.gz`` ships inside the
``openai-clip`` (package ``clip``) and ``open_clip_torch`` (package ``open_clip``) distributions, so a
tokenizer never has to be downloaded.
"""

from __future__ import annotations

import copy
import gzip
import html
import importlib.util
import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# Packages that ship the vocabulary; located without importing them (``import clip`` pulls torchvision).
VOCAB_PACKAGES = ("clip", "open_clip")


def find_vocab_file() -> Path:
    """Return the path of the CLIP BPE vocabulary shipped by an installed package."""
    for package in VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / VOCAB_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"the CLIP vocabulary ({VOCAB_FILE_NAME}) was not found: install it with `pip install openai-clip`"
    )


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character map (from OpenAI's simple_tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def read_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's token -> id table and merge list exactly as OpenAI's SimpleTokenizer does."""
    with gzip.open(path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    tokens = list(bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"{path}: expected a {VOCAB_SIZE}-token CLIP vocabulary, got {len(tokens)}")
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path, pad_token: str = EOS_TOKEN) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer."""
    vocab, merges = read_vocab(find_vocab_file())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@lru_cache(maxsize=4)
def _cached_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="ti-clip-vocab-") as folder:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(Path(folder), pad_token), local_files_only=True)


def clip_tokenizer(pad_token: str = EOS_TOKEN):
    """A CLIPTokenizer with the real vocabulary. SD1 pads with EOS; SD2 and SDXL's second encoder with "!".

    Each call returns its own copy: tools such as diffusers' load_textual_inversion add tokens to a
    tokenizer, which must not leak into other models.
    """
    return copy.deepcopy(_cached_tokenizer(pad_token))


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise text as OpenAI's CLIP tokenizer does before BPE (ftfy, HTML entities, whitespace).

    transformers 5 dropped this step from CLIPTokenizer; doing it ourselves gives the same ids as
    the web UIs on every transformers version.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only changes rare characters (ligatures, curly quotes)
        pass
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()
