"""Token-aware chunking: split a document into pieces that fit the embedding model's window.

    tokenizer = tokenizer_for(ProviderConfig(provider="openai", model="text-embedding-3-small"))
    chunks = chunk_text(text, tokenizer=tokenizer, size=512, overlap=64,
                        title="Install guide", title_prefix=True)
    # [Chunk(seq=0, text="Install guide\\n\\nFirst paragraph ...", tokens=498), ...]

Splitting is semchunk's: it cuts at the most meaningful boundary that keeps a piece within
budget, trying paragraph breaks, then line breaks, then sentence ends, clause marks and words,
and only as a last resort characters. Sizes are counted with the model's own tokenizer where
one can be had offline:

- `local`: the model's own `tokenizer.json`, run by the `tokenizers` library (from the
  bundled all-MiniLM-L6-v2 or the model directory the local provider loads; never downloaded);
- `openai`: tiktoken's BPE, built from the `cl100k_base` ranks vendored in
  `embedq/data/tiktoken` (every OpenAI embedding model uses it). tiktoken would otherwise
  download that file at run time, which hangs or fails without a network, so tiktoken's own
  loader is never called;
- `ollama`, `fake` and anything that cannot be loaded: `ApproximateTokenizer`, one token per
  four UTF-8 bytes rounded up (Ollama has no tokenizer API). It is close for English prose and
  undercounts dense scripts, so keep some headroom below the model's context when using it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import lzma
import re
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from semchunk.semchunk import chunkerify  # the package re-exports it without __all__

from embedq.errors import ConfigurationError, EmbedqError

if TYPE_CHECKING:
    from collections.abc import Callable

    import tiktoken
    import tokenizers

    from embedq.providers import ProviderConfig

log = logging.getLogger("embedq.chunking")

MIN_CHUNK_SIZE = 8
"""The smallest chunk size accepted: a single character can cost four byte-level tokens, and
a chunk must hold at least one character next to its title prefix."""

TITLE_SEPARATOR = "\n\n"
TITLE_SHARE = 4
"""A title prefix may take at most 1/TITLE_SHARE of a chunk's tokens; a longer title is cut,
so the document's own text always keeps most of each chunk."""

_MEMO_SIZE = 4096  # token counts remembered per chunk_text call; semchunk asks for many twice


class Tokenizer(Protocol):
    """Counts tokens the way an embedding model will see them (without special tokens)."""

    name: str

    def count(self, text: str) -> int: ...


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: `text` is exactly what gets embedded (title prefix included
    when enabled) and `tokens` is its length under the collection's tokenizer."""

    seq: int
    text: str
    tokens: int


class HuggingFaceTokenizer:
    """A model's own tokenizer, loaded from its `tokenizer.json` with the `tokenizers` library.

    Truncation and padding stored in the file are switched off: they would cap or pad every
    count at the model's window (128 for all-MiniLM-L6-v2) and hide oversized chunks.

    Running the whole pipeline costs about 0.6 µs a character, and chunking counts each
    character several times over. Where the model's pre-tokenizer splits at whitespace (BERT
    and its kin: MiniLM, mpnet, bge, e5, gte, nomic), a text's count is the sum of its
    whitespace-separated words' counts, so words are counted once and remembered: about five
    times faster, and exact (checked against the full pipeline when loading).
    """

    def __init__(self, name: str, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import pre_tokenizers

        tokenizer: tokenizers.Tokenizer = HFTokenizer.from_file(str(path))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.name = name
        self._tokenizer = tokenizer
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=0) or None
        self._words: dict[str, int] = {}
        splits_at_whitespace = (
            pre_tokenizers.BertPreTokenizer,
            pre_tokenizers.Whitespace,
            pre_tokenizers.WhitespaceSplit,
        )
        # counted word by word while checking that doing so is exact for this tokenizer
        self._by_word = isinstance(tokenizer.pre_tokenizer, splits_at_whitespace)
        self._by_word = self._by_word and all(
            self.count(sample) == self._count_whole(sample) for sample in _WORD_SUM_SAMPLES
        )

    def count(self, text: str) -> int:
        if not self._by_word:
            return self._count_whole(text)
        words = _WHITESPACE.split(text)
        table = self._words
        missing = {word for word in words if word not in table}
        if not missing:
            return sum(map(table.__getitem__, words))
        fresh = self._count_words(missing)
        if len(table) + len(fresh) > _WORD_MEMO_SIZE:
            # a fresh table rather than clear(): another thread may be summing the old one
            table = self._words = {}
        # long "words" (base64, URLs) are rare and would make the memo heavy: not kept
        table.update((word, n) for word, n in fresh.items() if len(word) <= _MEMO_WORD_CHARS)
        return sum(fresh[word] if word in fresh else table[word] for word in words)

    def _count_whole(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _count_words(self, words: set[str]) -> dict[str, int]:
        """Each word's count from one pass over all of them: a call per word costs ~20 µs."""
        ordered = list(words)
        encoding = self._tokenizer.encode(ordered, is_pretokenized=True, add_special_tokens=False)
        counts = dict.fromkeys(ordered, 0)
        for index in encoding.word_ids:  # the position in `ordered` each token came from
            if index is not None:
                counts[ordered[index]] += 1
        return counts


# What BERT-style normalizers leave as whitespace (tab, newline, carriage return, the Zs
# spaces, line and paragraph separators). Control characters are not in it: the normalizer
# deletes them, so they join the text on either side rather than split it.
_WHITESPACE = re.compile(r"[ \t\n\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_WORD_MEMO_SIZE = 200_000  # words remembered per tokenizer: ~20 MB at most
_MEMO_WORD_CHARS = 48
_WORD_SUM_SAMPLES = (
    "Héllo wörld! naïve café, state-of-the-art: don't 3.14159 http://x.org/a?b=c#d",
    "東京都は日本の首都です。 ﬁne \U0001d518\U0001d52b 😀😀 x\u0301y a\x00b c\x0bd",
    "e\u200bf\u2028g\u00a0h\ti\r\nj \u3000k\u2003l",
)


class TiktokenTokenizer:
    """An OpenAI BPE encoding; special-token strings in documents count as plain text."""

    def __init__(self, name: str, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self._encoding = encoding
        self.max_token_chars = max(len(t) for t in encoding.token_byte_values())

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))


class ApproximateTokenizer:
    """ceil(UTF-8 bytes / 4): OpenAI's rule of thumb for English, for models whose tokenizer
    cannot be loaded here. An estimate, not a guarantee: CJK text and code cost more."""

    name = "approx:utf8-bytes/4"
    max_token_chars = 4

    def count(self, text: str) -> int:
        return (len(text.encode("utf-8")) + 3) // 4


# --- picking the tokenizer for a provider -------------------------------------------------

_cache: dict[tuple[str, str], Tokenizer] = {}
_cache_lock = threading.Lock()


def tokenizer_for(config: ProviderConfig) -> Tokenizer:
    """The tokenizer that sizes chunks for `config`'s model, loaded once per model.

    Never touches the network and never raises for a missing tokenizer: where the model's own
    cannot be had, it logs one warning and counts with `ApproximateTokenizer`.
    """
    key = (config.provider, config.model)
    with _cache_lock:
        tokenizer = _cache.get(key)
        if tokenizer is None:
            tokenizer = _cache[key] = _load(config.provider, config.model)
        return tokenizer


def _load(provider: str, model: str) -> Tokenizer:
    if provider == "local":
        return _local_tokenizer(model)
    if provider == "openai":
        return _openai_tokenizer(model)
    if provider == "ollama":
        log.info(
            "Ollama has no tokenizer API: chunks for %r are sized with %s, an estimate",
            model,
            ApproximateTokenizer.name,
        )
    return ApproximateTokenizer()


def _local_tokenizer(model: str) -> Tokenizer:
    # the provider decides where a local model lives (bundled, or a directory; never fetched)
    from embedq.providers.local import model_dir

    try:
        path = model_dir(model) / "tokenizer.json"
    except EmbedqError as exc:
        problem = str(exc)
    else:
        if not path.is_file():
            problem = f"{path} does not exist"
        else:
            try:
                return HuggingFaceTokenizer(f"hf:{model}", path)
            except Exception as exc:  # the tokenizers library raises bare Exceptions
                problem = f"cannot load {path}: {exc}"
    log.warning(
        "no tokenizer for local model %r (%s): chunks are sized with %s, an estimate",
        model,
        problem,
        ApproximateTokenizer.name,
    )
    return ApproximateTokenizer()


@dataclass(frozen=True)
class _Encoding:
    sha256: str  # of the uncompressed file, as tiktoken pins it: proves what was vendored
    pat_str: str
    special_tokens: dict[str, int]


# Copied from tiktoken_ext/openai_public.py (MIT, OpenAI): tiktoken only offers them
# together with a download of the ranks.
_ENCODINGS = {
    "cl100k_base": _Encoding(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}
_FALLBACK_ENCODING = "cl100k_base"


def _openai_tokenizer(model: str) -> Tokenizer:
    from tiktoken.model import encoding_name_for_model

    try:
        wanted = encoding_name_for_model(model)
    except KeyError:
        # An OpenAI-compatible server's own model (vLLM, TEI, ...): its tokenizer is unknown
        # here, and OpenAI's embedding encoding is the closest stand-in.
        log.info(
            "%r is not an OpenAI model tiktoken knows: its chunks are sized with %s, an estimate",
            model,
            _FALLBACK_ENCODING,
        )
        wanted = _FALLBACK_ENCODING
    name = wanted if wanted in _ENCODINGS else _FALLBACK_ENCODING
    if name != wanted:
        log.warning(
            "tiktoken encoding %s (model %r) is not bundled with embedq: chunks are sized "
            "with %s, an estimate",
            wanted,
            model,
            name,
        )
    encoding = _vendored_encoding(name)
    if encoding is None:
        log.warning(
            "the bundled tiktoken file for %s is missing or damaged (reinstall embedq): "
            "chunks for %r are sized with %s, an estimate",
            name,
            model,
            ApproximateTokenizer.name,
        )
        return ApproximateTokenizer()
    return TiktokenTokenizer(f"tiktoken:{name}", encoding)


@cache
def _vendored_encoding(name: str) -> tiktoken.Encoding | None:
    """tiktoken's `name` encoding from the xz-compressed ranks file shipped in this package."""
    import tiktoken

    spec = _ENCODINGS[name]
    try:
        packed = resources.files("embedq").joinpath("data", "tiktoken", f"{name}.tiktoken.xz")
        raw = lzma.decompress(packed.read_bytes())
    except (OSError, lzma.LZMAError):
        return None
    if hashlib.sha256(raw).hexdigest() != spec.sha256:
        return None
    # the .tiktoken format: one "base64(token) rank" pair a line
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens
    )


# --- chunking -------------------------------------------------------------------------------


def chunk_text(
    text: str,
    *,
    tokenizer: Tokenizer,
    size: int,
    overlap: int,
    title: str | None = None,
    title_prefix: bool = False,
) -> list[Chunk]:
    """Split `text` into chunks of at most `size` tokens, consecutive ones sharing about
    `overlap` tokens.

    With `title_prefix`, each chunk embeds as `f"{title}\\n\\n{piece}"` and the title's tokens
    come out of each chunk's budget (a title longer than a quarter of `size` is cut). Blank
    text gives no chunk, or a single chunk of the title when there is one. Deterministic.
    """
    _check_sizes(size, overlap)
    count = lru_cache(maxsize=_MEMO_SIZE)(tokenizer.count)
    clean_title = " ".join(title.split()) if title else ""

    if not text.strip():
        if not clean_title:
            return []
        only = _truncate(clean_title, size, count)
        return [Chunk(seq=0, text=only, tokens=count(only))] if only else []

    prefix = ""
    if title_prefix and clean_title:
        cut = _truncate(clean_title, size // TITLE_SHARE, count, suffix=TITLE_SEPARATOR)
        prefix = f"{cut}{TITLE_SEPARATOR}" if cut else ""
    budget = size - (count(prefix) if prefix else 0)
    # semchunk needs room for its overlap inside the budget the title left over
    overlap = min(overlap, budget - 1)

    body = text.strip()
    # semchunk's overlap cuts into overlap-sized windows first, so even a text that fits
    # would come back as several overlapping chunks
    pieces = [body] if count(body) <= budget else _split(body, budget, overlap, count, tokenizer)
    fitted = [p for piece in pieces for p in _fit(piece, prefix, size, budget, count, tokenizer)]
    chunks = []
    for seq, piece in enumerate(fitted):
        embedded = prefix + piece
        chunks.append(Chunk(seq=seq, text=embedded, tokens=count(embedded)))
    return chunks


def _check_sizes(size: int, overlap: int) -> None:
    if size < MIN_CHUNK_SIZE:
        raise ConfigurationError(
            f"chunk_size must be at least {MIN_CHUNK_SIZE} tokens, not {size}; "
            "raise the collection's chunk_size"
        )
    if overlap < 0:
        raise ConfigurationError(
            f"chunk_overlap must be 0 or more tokens, not {overlap}; set chunk_overlap to 0 "
            "for no overlap"
        )
    if overlap >= size:
        raise ConfigurationError(
            f"chunk_overlap ({overlap}) must be smaller than chunk_size ({size}); "
            "lower chunk_overlap or raise chunk_size"
        )


def _split(
    text: str, budget: int, overlap: int, count: Callable[[str], int], tokenizer: Tokenizer
) -> list[str]:
    def guarded(piece: str) -> int:
        # semchunk recurses without end on a single character over budget (it cannot split
        # it further), so it is told such a character fits; `_fit` checks the real counts
        return count(piece) if len(piece) > 1 else min(count(piece), 1)

    # memoize=False: semchunk's own memo is a process-wide dict keyed by counter, never
    # emptied, which would grow with every counter made here; `count` is memoized per call
    chunker = chunkerify(
        guarded,
        budget,
        max_token_chars=getattr(tokenizer, "max_token_chars", None),
        memoize=False,
    )
    # one text in gives one list of chunks out (the union covers batches and offsets)
    pieces = cast("list[str]", chunker(text, overlap=overlap or None))
    # an overlap window is sliced from the source text and may end on the whitespace after it
    return [stripped for piece in pieces if (stripped := piece.strip())]


def _fit(
    piece: str,
    prefix: str,
    size: int,
    budget: int,
    count: Callable[[str], int],
    tokenizer: Tokenizer,
) -> list[str]:
    """`piece`, re-split until each part fits `size` with the prefix in front.

    semchunk keeps each split within budget, but an overlap window joins several splits with
    the text between them, and BPE can merge across the title separator, so a chunk may come
    out a few tokens over; it is split again with a budget lowered by the excess.
    """
    excess = count(prefix + piece) - size
    if excess <= 0:
        return [piece]
    smaller = budget - excess
    if smaller >= 1:
        parts = _split(piece, smaller, 0, count, tokenizer)
        if len(parts) > 1:
            return [
                p for part in parts for p in _fit(part, prefix, size, smaller, count, tokenizer)
            ]
    return _cut(piece, prefix, size, count)


def _cut(piece: str, prefix: str, size: int, count: Callable[[str], int]) -> list[str]:
    """The last resort for text no boundary can split within budget: cut at characters."""
    parts = []
    rest = piece
    while rest:
        head = _longest_fitting(rest, lambda s: count(prefix + s) <= size)
        head = head or rest[0]  # one character over budget: a tokenizer we cannot do better with
        parts.append(head)
        rest = rest[len(head) :].lstrip()
    return parts


def _truncate(text: str, limit: int, count: Callable[[str], int], suffix: str = "") -> str:
    """`text`, cut to the longest start whose tokens (with `suffix`) are within `limit`."""
    if count(text + suffix) <= limit:
        return text
    return _longest_fitting(text, lambda s: count(s + suffix) <= limit).rstrip()


def _longest_fitting(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of `text` that `fits`; token counts grow with length, so bisect."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[:middle]):
            low = middle
        else:
            high = middle - 1
    return text[:low]
