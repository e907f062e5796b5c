"""clean_text: chat markdown in, what a voice should read out."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.upstreams.clean import clean_text


@pytest.mark.parametrize(
    ("markdown", "spoken"),
    [
        ("Plain words stay.", "Plain words stay."),
        ("**bold** and __strong__", "bold and strong"),
        ("*italic* and _emphasis_", "italic and emphasis"),
        ("~~gone~~ but said", "gone but said"),
        ("***both*** at once", "both at once"),
        ("# Title", "Title."),
        ("## Section ##\nBody text.", "Section. Body text."),
        ("Heading\n=======\nText", "Heading Text"),
        ("- one\n- two\n- three", "one. two. three."),
        ("* starred\n+ plussed", "starred. plussed."),
        ("1. first\n2) second", "first. second."),
        ("- [ ] todo\n- [x] done", "todo. done."),
        ("> quoted **words**", "quoted words"),
        ("> > nested quote", "nested quote"),
        ("See [the docs](https://example.com/docs) now", "See the docs now"),
        ("![a cat](https://example.com/cat.png) sleeps", "a cat sleeps"),
        ("Ref [link][1] here\n\n[1]: https://example.com", "Ref link here"),
        ("Go to https://example.com/a?b=c now", "Go to now"),
        ("Visit www.example.org.", "Visit."),
        ("Mail <https://example.com> me", "Mail me"),
        ("Call `foo()` first", "Call foo() first"),
        ("Use ``a `tick` b`` here", "Use a tick b here"),
        ("Before\n```python\nprint('code')\n```\nAfter", "Before After"),
        ("Before\n~~~\nraw\n~~~\nAfter", "Before After"),
        ("Unclosed\n```\ncode forever", "Unclosed"),
        ("| Name | Age |\n|------|----:|\n| Ann | 31 |", "Name, Age. Ann, 31."),
        ("Rule above\n\n---\n\nbelow", "Rule above below"),
        ("Great job 👍🏽!", "Great job!"),
        ("Flags 🇫🇷 and family 👨‍👩‍👧 and heart ❤️", "Flags and family and heart"),
        ("Done ✅", "Done"),
        ("x &amp; y <b>bold</b> <br/>", "x & y bold"),
        ("  lots   of\n\n\n space\t here  ", "lots of space here"),
    ],
)
def test_markdown_becomes_speakable(markdown: str, spoken: str) -> None:
    assert clean_text(markdown) == spoken


@pytest.mark.parametrize(
    "text",
    [
        "snake_case_name stays whole",
        "2 * 3 * 4 = 24",
        "Café naïve façade",
        "日本語のテキスト",
        "Prices rose 5% to $10.",
        "It's a question? Yes!",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert clean_text(text) == text


def test_a_message_of_only_markup_is_empty() -> None:
    assert clean_text("```\ncode\n```\n\nhttps://example.com 🎉") == ""


def test_a_chat_answer_reads_as_prose() -> None:
    answer = (
        "## Summary\n\n"
        "Here is **what I found**:\n\n"
        "1. The `config.toml` file sets the port.\n"
        "2. See [the guide](https://docs.example.com/guide) 📘\n\n"
        "```bash\nmake run\n```\n"
        "Let me know! 😊"
    )
    assert clean_text(answer) == (
        "Summary. Here is what I found: The config.toml file sets the port. See the guide. "
        "Let me know!"
    )


@given(st.text(max_size=300))
def test_cleaning_is_idempotent_and_tidy(text: str) -> None:
    once = clean_text(text)
    assert clean_text(once) == once
    assert once == once.strip()
    assert "  " not in once
    assert "\n" not in once


@pytest.mark.parametrize(
    "hostile",
    ["[a](b " * 30_000, "![a](b " * 30_000, "[ a " * 40_000, "`` a ` " * 30_000, "**a " * 60_000],
)
def test_stray_markup_in_a_long_message_stays_fast(hostile: str) -> None:
    started = time.perf_counter()
    clean_text(hostile)
    assert time.perf_counter() - started < 1.0
