"""What a synthesizer should say: chat markdown turned into plain, speakable text."""

from __future__ import annotations

import html
import re
from typing import Final

# Code is not read aloud: a fenced block goes entirely, even when the closing fence is missing.
_FENCE: Final = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[^\n]*$|\Z)", re.M | re.S)
_REFERENCE_DEFINITION: Final = re.compile(r"^[ \t]*\[[^\]\n]+\]:[ \t]*\S+.*$", re.M)
_HEADING: Final = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t#]*$")
_SETEXT_OR_RULE: Final = re.compile(r"^[ \t]*(?:[=]{2,}|[-*_][ \t]*(?:[-*_][ \t]*){2,})$")
_QUOTE: Final = re.compile(r"^[ \t]*(?:>[ \t]?)+")
_LIST_ITEM: Final = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?")
_TABLE_SEPARATOR: Final = re.compile(
    r"^[ \t]*\|?[ \t]*:?-{2,}:?[ \t]*(?:\|[ \t]*:?-{2,}:?[ \t]*)*\|?[ \t]*$"
)
# Bounded, and a destination stops at whitespace (but for a quoted title): stray brackets in a
# long message must not make each match scan to the end of the text.
_DESTINATION: Final = r"\([^()\s]*(?:\s+\"[^\"]{0,200}\")?\)"
_IMAGE: Final = re.compile(r"!\[([^\[\]\n]{0,300})\]" + _DESTINATION)
_LINK: Final = re.compile(r"\[([^\[\]\n]{1,300})\](?:" + _DESTINATION + r"|\[[^\[\]\n]{0,100}\])")
_AUTOLINK: Final = re.compile(r"<(?:https?|ftp|mailto):[^>\s]*>", re.I)
# A sentence's own full stop after a URL is not part of the URL.
_URL: Final = re.compile(
    r"\b(?:https?://|ftp://|www\.)(?:[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'\"`])?", re.I
)
# Spans are bounded so an unclosed marker cannot make every match scan to the end of the text;
# the markers of a longer span are stripped as leftovers anyway.
_INLINE_CODE: Final = re.compile(r"(`+)(.{1,500}?)\1", re.S)
_STRONG: Final = re.compile(r"(\*\*|__)(?=\S)(.{1,200}?)(?<=\S)\1")
_STAR_EMPHASIS: Final = re.compile(r"\*(?=\S)([^*\n]+?)(?<=\S)\*")
# An underscore inside a word (snake_case) is not emphasis.
_UNDERSCORE_EMPHASIS: Final = re.compile(r"(?<!\w)_(?=\S)([^_\n]+?)(?<=\S)_(?!\w)")
_STRIKE: Final = re.compile(r"~~(?=\S)(.{1,200}?)(?<=\S)~~")
_HTML_TAG: Final = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_LEFTOVER_MARKUP: Final = re.compile(r"(?:\*{2,}|_{2,}|~{2,}|`+)")
_EMOJI: Final = re.compile(
    "["
    "\U0001f000-\U0001faff"  # mahjong, cards, enclosed, pictographs, emoticons, transport, symbols
    "\U0001fb00-\U0001fbff"
    "\u2600-\u27bf"  # miscellaneous symbols and dingbats
    "\u2b00-\u2bff"  # arrows and stars used as emoji
    "\u2300-\u23ff"  # watch, hourglass, media controls
    "\u2190-\u21ff"
    "\u3030\u303d\u3297\u3299"
    "\u00a9\u00ae\u2122\u2139\u203c\u2049"
    "\ufe0e\ufe0f\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "\U000e0020-\U000e007f"  # tag characters of subdivision flags
    "]+"
)
_SPACE_BEFORE_PUNCTUATION: Final = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCTUATION: Final = re.compile(r"([,.;:])(?:\s*[,.;:])+")
_WHITESPACE: Final = re.compile(r"\s+")
_SENTENCE_END: Final = (".", "!", "?", ":", ";", ",")
_MAX_PASSES: Final = 4


def clean_text(text: str) -> str:
    """Markdown, code, URLs and emoji stripped, whitespace collapsed: what a voice should read."""
    # Stripping one layer can uncover another ("**_x_**", "> # x"): clean until nothing changes.
    for _ in range(_MAX_PASSES):
        cleaned = _clean_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _clean_once(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _FENCE.sub("\n", text)
    text = _REFERENCE_DEFINITION.sub("", text)
    lines = [_clean_line(line) for line in text.split("\n")]
    text = " ".join(line for line in lines if line)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _AUTOLINK.sub("", text)
    text = _URL.sub("", text)
    text = _INLINE_CODE.sub(lambda m: m.group(2).strip(), text)
    text = _STRONG.sub(r"\2", text)
    text = _STAR_EMPHASIS.sub(r"\1", text)
    text = _UNDERSCORE_EMPHASIS.sub(r"\1", text)
    text = _STRIKE.sub(r"\1", text)
    text = _HTML_TAG.sub("", text)
    text = html.unescape(text)
    text = _EMOJI.sub("", text)
    text = _LEFTOVER_MARKUP.sub("", text)
    text = _WHITESPACE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _REPEATED_PUNCTUATION.sub(r"\1", text)
    return text.strip(" ,;:")


def _clean_line(line: str) -> str:
    """One source line without its block markup; a heading, item or row ends as a sentence."""
    if not line.strip() or _SETEXT_OR_RULE.match(line) or _TABLE_SEPARATOR.match(line):
        return ""
    line = _QUOTE.sub("", line)
    block = False
    heading = _HEADING.match(line)
    if heading is not None:
        line, block = heading.group(1), True
    item = _LIST_ITEM.match(line)
    if item is not None:
        line, block = line[item.end() :], True
    if line.count("|") >= 2 or line.lstrip().startswith("|"):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        line, block = ", ".join(cell for cell in cells if cell), True
    line = line.strip()
    # Without a full stop, list items and headings would run together into one breathless sentence.
    if block and line and not line.endswith(_SENTENCE_END):
        line += "."
    return line
