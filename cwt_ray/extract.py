"""Answer extractors, keyed by the task's answer type.

An extractor reads what a student wrote and says which answer it gave, whether it gave it in the
task's answer format (`correct_format`), and whether the gold answer appears anywhere
(`contains_answer`). Gold answers from data files go through the same parser, so a row whose
answer cannot be read is rejected up front rather than scored wrong forever.

`stated` is the strict half of `extract`: the answer a text carries in the task's answer format
or an explicit phrase ("the answer is 7", "So the answer: no"). `extract` then falls back to the
last yes/no word, number, choice mark or line, which suits scoring a student's output but not
judging a human-written rationale: "there is no evidence that ..." states no "no". The data
stage's agreement filter judges rationales by `stated` alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

# A number as people write it in rationales: optional sign and currency, thousands commas,
# decimals, a bare leading decimal point.
_NUMBER = re.compile(r"(?<![\w.])-?\s?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)|(?<![\w.])-?\.\d+")


def parse_number(text: str) -> Optional[Decimal]:
    """'$1,234.50' -> Decimal('1234.50'); None when the text holds no number."""
    m = _NUMBER.search(text)
    if not m:
        return None
    raw = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        return Decimal(raw)
    except InvalidOperation:
        return None


def format_number(value: Decimal) -> str:
    """Canonical text: no trailing zeros, no exponent ('72', '0.5', '-3')."""
    norm = value.normalize()
    text = format(norm, "f")
    return text if text not in ("-0",) else "0"


@dataclass(frozen=True)
class Extraction:
    answer: Optional[str]   # canonical answer text, None when nothing could be read
    formatted: bool         # found in the task's answer format (e.g. after '####')


NOTHING_STATED = Extraction(None, False)
# An explicit statement in prose: "the answer is 7", "So the answer: no". What follows it on the
# same line is read ("answer:" ending a line does not reach into the next one); "answered" and
# "answer isn't" are not statements. The word-start check is a lookbehind after the literal, not a
# leading \b: tried at every position, that \b made the pattern ~3x slower on prose without it.
_ANSWER_IS = re.compile(r"answer(?<!\wanswer)(?:[ \t]+is\b|[ \t]*:)[: \t]*(.*)", re.IGNORECASE)


def _answer_phrases(text: str) -> list[str]:
    """What follows each explicit statement of the answer in a text, to the end of its line."""
    # A substring test first: the case-insensitive pattern scans every character (~4 us per 600),
    # and most rationales people write never use the word ('answer', 'Answer' or 'ANSWER').
    if "nswer" not in text and "NSWER" not in text:
        return []
    return _ANSWER_IS.findall(text)


class NumberExtractor:
    """Numbers: '#### 72', 'The answer is $1,234.', '-3', '0.5 kg'."""

    def __init__(self, answer_template: str):
        prefix, _, suffix = answer_template.partition("{answer}")
        # The answer format is located by the template's fixed text before the slot.
        self._formatted = re.compile(re.escape(prefix.strip()) + r"\s*(.+)") if prefix.strip() else None

    def normalize_gold(self, answer: str) -> Optional[str]:
        value = parse_number(str(answer))
        return None if value is None else format_number(value)

    def stated(self, text: str) -> Extraction:
        if self._formatted:
            for hit in self._formatted.findall(text):
                value = parse_number(hit)
                if value is not None:
                    return Extraction(format_number(value), True)
        for hit in _answer_phrases(text):
            value = parse_number(hit)
            if value is not None:
                return Extraction(format_number(value), False)
        return NOTHING_STATED

    def extract(self, text: str) -> Extraction:
        got = self.stated(text)
        if got.answer is not None:
            return got
        numbers = [parse_number(m.group(0)) for m in _NUMBER.finditer(text)]
        numbers = [n for n in numbers if n is not None]
        return Extraction(format_number(numbers[-1]) if numbers else None, False)

    def contains(self, text: str, gold: str) -> bool:
        target = Decimal(gold)
        return any(parse_number(m.group(0)) == target for m in _NUMBER.finditer(text))

    @staticmethod
    def is_correct(predicted: Optional[str], gold: str) -> bool:
        return predicted is not None and Decimal(predicted) == Decimal(gold)


def _line_after(pattern: re.Pattern | None, text: str) -> list[str]:
    """What follows each match of the answer format's prefix, up to the end of its line."""
    return [hit.split("\n")[0] for hit in pattern.findall(text)] if pattern else []


def _prefix_pattern(answer_template: str) -> re.Pattern | None:
    prefix = answer_template.partition("{answer}")[0].strip()
    return re.compile(re.escape(prefix) + r"[ \t]*(.*)") if prefix else None


class YesNoExtractor:
    """Yes/no questions: 'Yes.', '**no**', 'True', 'The answer is no, because...'. 'yesterday' is not
    'yes'; true/false count as yes/no (StrategyQA-style data writes both)."""

    _WORD = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
    _CANON = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}

    def __init__(self, answer_template: str):
        self._formatted = _prefix_pattern(answer_template)

    def _first(self, text: str) -> Optional[str]:
        m = self._WORD.search(text)
        return self._CANON[m.group(1).lower()] if m else None

    def normalize_gold(self, answer: str) -> Optional[str]:
        text = str(answer).strip()
        m = self._WORD.fullmatch(text.strip(" .!*\"'"))
        return self._CANON[m.group(1).lower()] if m else None

    def stated(self, text: str) -> Extraction:
        for hit in _line_after(self._formatted, text):
            if (got := self._first(hit)) is not None:
                return Extraction(got, True)
        for hit in _answer_phrases(text):
            if (got := self._first(hit)) is not None:
                return Extraction(got, False)
        return NOTHING_STATED

    def extract(self, text: str) -> Extraction:
        got = self.stated(text)
        if got.answer is not None:
            return got
        words = self._WORD.findall(text)
        return Extraction(self._CANON[words[-1].lower()] if words else None, False)

    def contains(self, text: str, gold: str) -> bool:
        return any(self._CANON[w.lower()] == gold for w in self._WORD.findall(text))

    @staticmethod
    def is_correct(predicted: Optional[str], gold: str) -> bool:
        return predicted == gold


class ChoiceExtractor:
    """Multiple-choice letters A-J: '#### (B)', '#### b', 'The answer is C)', '(D) 42 apples'.
    A bare capital outside a choice mark ('A farmer has...') is not an answer."""

    _MARKED = re.compile(r"\(([A-Ja-j])\)|(?<![\w(])([A-Ja-j])\)")
    _BARE = re.compile(r"^\W*\(?([A-Ja-j])\b(?:\)|\.|:|\s|$)")

    def __init__(self, answer_template: str):
        self._formatted = _prefix_pattern(answer_template)

    def _letter(self, text: str, bare_ok: bool) -> Optional[str]:
        m = self._BARE.match(text) if bare_ok else None
        if m:
            return m.group(1).upper()
        m = self._MARKED.search(text)
        return (m.group(1) or m.group(2)).upper() if m else None

    def normalize_gold(self, answer: str) -> Optional[str]:
        text = str(answer).strip()
        m = re.fullmatch(r"\(?([A-Ja-j])[).]?", text)
        return m.group(1).upper() if m else None

    def stated(self, text: str) -> Extraction:
        for hit in _line_after(self._formatted, text):
            if (got := self._letter(hit, bare_ok=True)) is not None:
                return Extraction(got, True)
        for hit in _answer_phrases(text):
            if (got := self._letter(hit, bare_ok=True)) is not None:
                return Extraction(got, False)
        return NOTHING_STATED

    def extract(self, text: str) -> Extraction:
        got = self.stated(text)
        if got.answer is not None:
            return got
        marks = self._MARKED.findall(text)
        return Extraction((marks[-1][0] or marks[-1][1]).upper() if marks else None, False)

    def contains(self, text: str, gold: str) -> bool:
        return any((a or b).upper() == gold for a, b in self._MARKED.findall(text))

    @staticmethod
    def is_correct(predicted: Optional[str], gold: str) -> bool:
        return predicted == gold


def normalize_text(text: str) -> str:
    """Case, surrounding punctuation/markup and runs of whitespace do not make answers differ."""
    return " ".join(str(text).strip().strip(".!*`\"'").casefold().split())


class ExactExtractor:
    """Free-text answers compared after normalize_text (e.g. last-letter concatenation: 'nkyu')."""

    def __init__(self, answer_template: str):
        self._formatted = _prefix_pattern(answer_template)

    def normalize_gold(self, answer: str) -> Optional[str]:
        norm = normalize_text(answer)
        return norm or None

    def stated(self, text: str) -> Extraction:
        for hit in _line_after(self._formatted, text):
            if normalize_text(hit):
                return Extraction(normalize_text(hit), True)
        for hit in _answer_phrases(text):
            if normalize_text(hit):
                return Extraction(normalize_text(hit), False)
        return NOTHING_STATED

    def extract(self, text: str) -> Extraction:
        got = self.stated(text)
        if got.answer is not None:
            return got
        lines = [normalize_text(line) for line in text.splitlines() if normalize_text(line)]
        return Extraction(lines[-1] if lines else None, False)

    def contains(self, text: str, gold: str) -> bool:
        return gold in normalize_text(text)

    @staticmethod
    def is_correct(predicted: Optional[str], gold: str) -> bool:
        return predicted == gold


EXTRACTORS: dict[str, Callable] = {"number": NumberExtractor, "yes_no": YesNoExtractor, "choice": ChoiceExtractor,
                                   "exact": ExactExtractor}


def get_extractor(answer_type: str, answer_template: str):
    return EXTRACTORS[answer_type](answer_template)
