"""Reading files into documents: each supported type, and every bad file reported, not raised."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from pypdf import PdfWriter

from embedq.ingest import Skipped, SourceDoc, discover, read_file


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A real PDF, one Helvetica text line a page, with an /Info title: small enough to write
    by hand, with the cross-reference table pypdf checks."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    kids = b" ".join(b"%d 0 R" % p for p in page_ids)
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages)),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, text in zip(page_ids, pages, strict=True):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % escaped.encode("latin-1")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    info_id = 4 + 2 * len(pages)
    if title is not None:
        objects[info_id] = b"<< /Title (%s) >>" % title.encode("latin-1")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = out.tell()
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, objects[number]))
    xref = out.tell()
    size = max(objects) + 1
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
    for number in range(1, size):
        out.write(b"%010d 00000 n \n" % offsets[number])
    info = b" /Info %d 0 R" % info_id if title is not None else b""
    out.write(b"trailer\n<< /Size %d /Root 1 0 R%s >>\n" % (size, info))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def encrypted(pdf: bytes, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(pdf))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def read_all(path: Path, root: Path) -> list[SourceDoc | Skipped]:
    return list(read_file(path, root))


def only(path: Path, root: Path) -> SourceDoc | Skipped:
    [item] = read_all(path, root)
    return item


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "guides" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("Plain text.\n\nTwo paragraphs.\n")
    (root / "guides" / "install.md").write_text(
        "Intro line.\n\n```bash\n# not a title: a shell comment\n```\n\n# Install guide #\n\nRun it.\n"
    )
    (root / "guides" / "deep" / "page.html").write_text(
        "<html><head><title> The  Page </title><style>p {color: red}</style>"
        "<script>var hidden = 1;</script></head><body><h1>Heading</h1>"
        "<p>First <b>bold</b> paragraph.</p><p>Second<br>line.</p>"
        "<table><tr><td>a</td><td>b</td></tr></table><noscript>no js</noscript></body></html>"
    )
    (root / "report.PDF").write_bytes(
        make_pdf(["Page one text.", "Page two text."], title="Report")
    )
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "notes.txt").write_text("inside a hidden folder")
    return root


class TestDiscover:
    def test_walks_folders_for_supported_files_only_sorted(self, corpus: Path) -> None:
        assert discover([corpus]) == [
            corpus / "a.txt",
            corpus / "guides" / "deep" / "page.html",
            corpus / "guides" / "install.md",
            corpus / "report.PDF",
        ]

    def test_files_named_explicitly_are_kept_whatever_they_are(self, corpus: Path) -> None:
        named = [corpus / "image.png", corpus / ".hidden.txt", corpus / "missing.txt"]
        found = discover([*named, corpus / "a.txt", corpus])
        assert set(named) <= set(found)
        assert found.count(corpus / "a.txt") == 1
        assert found == sorted(found)


class TestFileTypes:
    def test_text(self, corpus: Path) -> None:
        doc = only(corpus / "a.txt", corpus)
        assert doc == SourceDoc(
            key="a.txt",
            text="Plain text.\n\nTwo paragraphs.\n",
            title=None,
            metadata={"path": "a.txt", "type": ".txt"},
        )

    def test_markdown_title_is_the_first_h1_outside_code(self, corpus: Path) -> None:
        doc = only(corpus / "guides" / "install.md", corpus)
        assert isinstance(doc, SourceDoc)
        assert doc.key == "guides/install.md"
        assert doc.title == "Install guide"
        assert doc.text.startswith("Intro line.")
        assert doc.metadata == {"path": "guides/install.md", "type": ".md"}

    def test_markdown_without_heading_has_no_title(self, tmp_path: Path) -> None:
        (tmp_path / "n.md").write_text("## Only a second-level heading\n\ntext\n")
        doc = only(tmp_path / "n.md", tmp_path)
        assert isinstance(doc, SourceDoc) and doc.title is None

    def test_html_keeps_visible_text_in_blocks(self, corpus: Path) -> None:
        doc = only(corpus / "guides" / "deep" / "page.html", corpus)
        assert isinstance(doc, SourceDoc)
        assert doc.title == "The Page"
        assert doc.text == "Heading\n\nFirst bold paragraph.\n\nSecond\nline.\n\na b"
        assert doc.metadata == {"path": "guides/deep/page.html", "type": ".html"}

    def test_pdf_text_of_every_page_and_metadata_title(self, corpus: Path) -> None:
        doc = only(corpus / "report.PDF", corpus)
        assert isinstance(doc, SourceDoc)
        assert doc.text == "Page one text.\n\nPage two text."
        assert doc.title == "Report"
        assert doc.metadata == {"path": "report.PDF", "type": ".pdf"}

    def test_pdf_encrypted_without_a_user_password_is_read(self, tmp_path: Path) -> None:
        path = tmp_path / "open.pdf"
        path.write_bytes(encrypted(make_pdf(["Readable anyway."]), user_password=""))
        doc = only(path, tmp_path)
        assert isinstance(doc, SourceDoc) and doc.text == "Readable anyway."

    def test_byte_order_mark_and_crlf(self, tmp_path: Path) -> None:
        (tmp_path / "bom.txt").write_bytes("\ufeffline one\r\nline two\rline three".encode())
        doc = only(tmp_path / "bom.txt", tmp_path)
        assert isinstance(doc, SourceDoc)
        assert doc.text == "line one\nline two\nline three"

    def test_a_file_outside_the_root_is_keyed_by_its_path(
        self, corpus: Path, tmp_path: Path
    ) -> None:
        doc = only(corpus / "a.txt", tmp_path / "elsewhere")
        assert isinstance(doc, SourceDoc) and doc.key == (corpus / "a.txt").as_posix()


class TestJsonl:
    def test_good_lines_go_in_and_bad_lines_are_named(self, tmp_path: Path) -> None:
        lines = [
            json.dumps({"key": "k1", "text": "first", "title": "T1", "metadata": {"lang": "en"}}),
            "",
            "{not json",
            json.dumps({"text": "no key"}),
            json.dumps({"key": "k2", "text": "second"}),
            json.dumps({"key": "k3", "text": "x", "metadata": ["not", "an", "object"]}),
            json.dumps(["a list"]),
            json.dumps({"key": "k1", "text": "again"}),
            json.dumps({"key": "k4", "text": 5}),
            json.dumps({"key": "k5", "text": "", "title": "title only"}),
            json.dumps({"key": "k6", "text": " "}),
            json.dumps({"key": "k7", "text": "t", "title": 7}),
        ]
        path = tmp_path / "docs.jsonl"
        path.write_text("\n".join(lines) + "\n")
        items = read_all(path, tmp_path)
        docs = [i for i in items if isinstance(i, SourceDoc)]
        skipped = [i for i in items if isinstance(i, Skipped)]
        assert docs == [
            SourceDoc(key="k1", text="first", title="T1", metadata={"lang": "en"}),
            SourceDoc(key="k2", text="second", title=None, metadata={}),
            SourceDoc(key="k5", text="", title="title only", metadata={}),
        ]
        assert all(s.path == str(path) for s in skipped)
        reasons = [s.reason for s in skipped]
        assert reasons[0].startswith("line 3: invalid JSON")
        assert reasons[1] == 'line 4: "key" (or BEIR\'s "_id") is missing or not a non-empty string'
        assert reasons[2] == 'line 6: "metadata" must be a JSON object'
        assert reasons[3] == "line 7: expected a JSON object, got list"
        assert reasons[4].startswith("line 8: duplicate key 'k1' (first on line 1)")
        assert reasons[5] == 'line 9: "text" is missing or not a string'
        assert reasons[6] == 'line 11: "text" is empty and there is no "title"'
        assert reasons[7] == 'line 12: "title" must be a string or null'
        assert len(skipped) == 8


class TestBadFiles:
    def test_binary_posing_as_text(self, tmp_path: Path) -> None:
        (tmp_path / "bin.txt").write_bytes(b"looks like text\x00\x01\x02 but is not")
        assert only(tmp_path / "bin.txt", tmp_path) == Skipped(
            str(tmp_path / "bin.txt"), "binary or not UTF-8 text"
        )

    def test_not_utf8(self, tmp_path: Path) -> None:
        (tmp_path / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
        item = only(tmp_path / "latin1.md", tmp_path)
        assert isinstance(item, Skipped) and item.reason.startswith("binary or not UTF-8 text")
        assert "convert it to UTF-8" in item.reason

    def test_binary_jsonl(self, tmp_path: Path) -> None:
        (tmp_path / "x.jsonl").write_bytes(b'{"key": "a"}\x00\xff')
        item = only(tmp_path / "x.jsonl", tmp_path)
        assert isinstance(item, Skipped) and item.reason == "binary or not UTF-8 text"

    @pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
    def test_empty(self, tmp_path: Path, content: bytes) -> None:
        for name in ("e.txt", "e.pdf", "e.jsonl", "e.html"):
            (tmp_path / name).write_bytes(content)
            assert only(tmp_path / name, tmp_path) == Skipped(str(tmp_path / name), "empty")

    def test_html_without_visible_text(self, tmp_path: Path) -> None:
        (tmp_path / "s.html").write_text("<script>only()</script><style>p{}</style>")
        item = only(tmp_path / "s.html", tmp_path)
        assert isinstance(item, Skipped) and item.reason == "no text in it"

    def test_unsupported_suffix_named_explicitly(self, corpus: Path) -> None:
        item = only(corpus / "image.png", corpus)
        assert isinstance(item, Skipped)
        assert item.reason.startswith("unsupported file type .png; use .htm, .html")

    def test_missing_file(self, tmp_path: Path) -> None:
        assert only(tmp_path / "gone.txt", tmp_path) == Skipped(
            str(tmp_path / "gone.txt"), "no such file"
        )

    def test_a_directory_named_like_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "x.txt").mkdir()
        assert only(tmp_path / "x.txt", tmp_path) == Skipped(
            str(tmp_path / "x.txt"), "is a directory"
        )

    @pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() == 0,
        reason="root reads files whatever their mode",
    )
    def test_unreadable_file(self, tmp_path: Path) -> None:
        path = tmp_path / "secret.txt"
        path.write_text("secret")
        path.chmod(0)
        try:
            item = only(path, tmp_path)
        finally:
            path.chmod(0o600)
        assert isinstance(item, Skipped) and item.reason.startswith("permission denied")

    def test_permission_denied_even_as_root(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "secret.md"
        path.write_text("secret")

        def refuse(self: Path) -> bytes:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
        assert only(path, tmp_path) == Skipped(str(path), "permission denied: cannot read the file")

    @pytest.mark.parametrize(
        "content",
        [
            b"%PDF-1.4\ngarbage, not a PDF at all\n%%EOF\n",
            make_pdf(["Cut short."])[:150],
            b"not even a header",
        ],
        ids=["garbage", "truncated", "no-header"],
    )
    def test_corrupt_pdf(self, tmp_path: Path, content: bytes) -> None:
        (tmp_path / "bad.pdf").write_bytes(content)
        item = only(tmp_path / "bad.pdf", tmp_path)
        assert isinstance(item, Skipped)
        assert item.reason.startswith("corrupt or unreadable PDF: ")

    def test_pdf_that_needs_a_password(self, tmp_path: Path) -> None:
        (tmp_path / "locked.pdf").write_bytes(encrypted(make_pdf(["Secret."]), user_password="pw"))
        item = only(tmp_path / "locked.pdf", tmp_path)
        assert isinstance(item, Skipped)
        assert item.reason.startswith("encrypted PDF that needs a password; decrypt it first")

    def test_one_bad_file_does_not_stop_the_others(self, corpus: Path) -> None:
        (corpus / "bad.pdf").write_bytes(b"%PDF-1.4\nbroken")
        (corpus / "zero.txt").write_bytes(b"")
        items = [item for path in discover([corpus]) for item in read_file(path, corpus)]
        keys = sorted(i.key for i in items if isinstance(i, SourceDoc))
        assert keys == ["a.txt", "guides/deep/page.html", "guides/install.md", "report.PDF"]
        assert sorted(Path(i.path).name for i in items if isinstance(i, Skipped)) == [
            "bad.pdf",
            "zero.txt",
        ]
