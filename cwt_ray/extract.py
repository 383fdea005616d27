"""Answer extractors, keyed by the task's answer type.

An extractor reads what a student wrote and says which answer it gave, whether it gave it in the
task's answer format (`correct_format`), and whether the gold answer appears anywhere
(`contains_answer`). Gold answers from data files go through the same parser, so a row whose
answer cannot be read is rejected up front rather than scored wrong forever.
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


class NumberExtractor:
    """Numbers: '#### 72', 'The answer is $1,234.', '-3', '0.5 kg'."""

    def __init__(self, answer_template: str):
        prefix, _, suffix = answer_template.partition("{answer}")
        # The answer format is located by the template's fixed text before the slot.
        self._formatted = re.compile(re.escape(prefix.strip()) + r"\s*(.+)") if prefix.strip() else None
        self._answer_is = re.compile(r"answer is[:\s]*(.+)", re.IGNORECASE)

    def normalize_gold(self, answer: str) -> Optional[str]:
        value = parse_number(str(answer))
        return None if value is None else format_number(value)

    def extract(self, text: str) -> Extraction:
        if self._formatted:
            hits = self._formatted.findall(text)
            for hit in hits:
                value = parse_number(hit)
                if value is not None:
                    return Extraction(format_number(value), True)
        for hit in self._answer_is.findall(text):
            value = parse_number(hit)
            if value is not None:
                return Extraction(format_number(value), False)
        numbers = [parse_number(m.group(0)) for m in _NUMBER.finditer(text)]
        numbers = [n for n in numbers if n is not None]
        return Extraction(format_number(numbers[-1]) if numbers else None, False)

    def contains(self, text: str, gold: str) -> bool:
        target = Decimal(gold)
        return any(parse_number(m.group(0)) == target for m in _NUMBER.finditer(text))

    @staticmethod
    def is_correct(predicted: Optional[str], gold: str) -> bool:
        return predicted is not None and Decimal(predicted) == Decimal(gold)


EXTRACTORS: dict[str, Callable[[str], NumberExtractor]] = {"number": NumberExtractor}


def get_extractor(answer_type: str, answer_template: str) -> NumberExtractor:
    return EXTRACTORS[answer_type](answer_template)
