"""Words for datatrove's blocks without NLTK or spaCy models (which would be downloaded at run time).

datatrove splits text into words with a tokenizer chosen by language (NLTK's punkt for English,
fetched on first use). Its blocks also take a :class:`~datatrove.utils.word_tokenizers.WordTokenizer`
object instead of a language; :data:`WORDS` is herd's: words are runs of letters and digits (any
script), punctuation marks are words of their own, sentences end at ``.``, ``!`` or ``?`` followed
by white space. It is what MinHash shingles and the Gopher rules count on.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WordTokenizer

_WORD = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class RegexWords(WordTokenizer):
    """Words and sentences by regular expressions; works for any space-separated language, offline."""

    def __init__(self) -> None:
        super().__init__("herd")

    def word_tokenize(self, text: str) -> list[str]:
        """Runs of letters/digits and single punctuation marks."""
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        """Sentences, split after ``.``, ``!`` or ``?`` and white space."""
        return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each sentence."""
        spans, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


WORDS = RegexWords()
