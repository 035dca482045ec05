"""The worker-side line splitter: whole lines out, the reference's newline rules, long lines
cut into 4095-character pieces with nothing lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyworker.iocore.lines import NEWLINE_RE, LineSplitter, normalize_newlines


def split_all(chunks: list[str]) -> str:
    s = LineSplitter()
    out = "".join(s.append(c) for c in chunks)
    return out + s.flush()


def test_whole_lines_only() -> None:
    s = LineSplitter()
    assert s.append("a\nb") == "a\n"
    assert s.append("c\n") == "bc\n"
    assert s.append("tail") == ""
    assert s.flush() == "tail\n"
    assert s.flush() == ""


def test_reference_newline_sequences() -> None:
    assert split_all(["a\r\nb\rc\x1b[ud\x1b[12;3He\x1b[2Jf\x08\x08g\n"]) == "a\nb\nc\nd\ne\nf\ng\n"
    # colours pass through untouched
    assert split_all(["\x1b[31mred\x1b[0m\n"]) == "\x1b[31mred\x1b[0m\n"


def test_lone_cr_at_end_waits_for_more_text() -> None:
    s = LineSplitter()
    assert s.append("progress\r") == ""
    assert s.append("\n") == "progress\n"


def test_long_line_cut_without_loss() -> None:
    line = "".join(chr(ord("a") + i % 26) for i in range(5010))
    out = split_all([line + "\n"])
    assert out == line[:4095] + "\n" + line[4095:] + "\n"


def test_exact_multiple_adds_no_empty_line() -> None:
    line = "x" * (4095 * 2)
    assert split_all([line + "\n"]) == "x" * 4095 + "\n" + "x" * 4095 + "\n"


def test_4095_is_not_cut_4096_is() -> None:
    assert split_all(["y" * 4095 + "\n"]) == "y" * 4095 + "\n"
    assert split_all(["y" * 4096 + "\n"]) == "y" * 4095 + "\ny\n"


def test_unterminated_long_output_is_streamed_in_pieces() -> None:
    s = LineSplitter()
    out = s.append("z" * 10000)
    assert out == ("z" * 4095 + "\n") * 2
    assert s.flush() == "z" * (10000 - 8190) + "\n"


_chunk_safe = st.text(alphabet=st.sampled_from("ab é€\n\r"), max_size=300)


@given(_chunk_safe, st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_chunking_does_not_change_the_result(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert split_all(chunks) == split_all([text])


@given(st.text(alphabet=st.sampled_from("ab\n\r\x08"), max_size=20000), st.integers(1, 9000))
def test_no_character_lost_and_lines_bounded(text: str, size: int) -> None:
    chunks = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    out = split_all(chunks)
    assert all(len(line) <= 4095 for line in out.split("\n"))
    def strip(t: str) -> str:
        return t.replace("\n", "").replace("\r", "").replace("\x08", "")

    assert strip(out) == strip(text)


@given(st.text(alphabet=st.sampled_from("a\n\r\x1b[u;2JH0\x08"), max_size=200))
def test_fast_newline_normalisation_equals_the_regex(text: str) -> None:
    assert normalize_newlines(text) == NEWLINE_RE.sub("\n", text)


@given(st.text(alphabet=st.sampled_from("ab\n\r"), max_size=200))
def test_fast_path_for_cr_text(text: str) -> None:
    assert normalize_newlines(text) == NEWLINE_RE.sub("\n", text)
