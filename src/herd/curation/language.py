"""Language identification (paper 3.1.1: fastText, 176 languages, per-language thresholds).

``model`` chooses the detector, both offline:

- the path of fastText's ``lid.176.bin`` (or ``.ftz``; the paper's model, which the user
  downloads once), read with the ``fasttext`` module;
- ``py3langid``: langid.py's model for 97 languages, shipped inside the ``py3langid`` package
  (4.5 MB), with probabilities normalised over its languages.

Each document gets ``metadata["language"]`` (ISO 639-1 code, as both models name them) and
``metadata["language_score"]``. It is removed when its language is not in ``keep`` (null keeps
every language, as Llama 3 does, which sorts them into the multilingual bucket later), or when its
score is under the language's threshold (``thresholds: {en: 0.65, default: 0.5}``). Text is read
with newlines turned into spaces, and at most ``max_chars`` of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from herd.curation.blocks import Block, CurationError, Documents, Verdict
from herd.paths import resolve

Detector = Callable[[str], tuple[str, float]]

NO_MODEL = ("blocks.language.model is not set: pass blocks.language.model=py3langid (a 97-language model that "
            "ships in the py3langid package) or blocks.language.model=/path/to/lid.176.bin (fastText's), or "
            "blocks.language.enabled=false")


def detector(model: str | None) -> Detector:
    """A function from text to (language, probability) for ``model`` (see the module docstring)."""
    if not model:
        raise CurationError(NO_MODEL)
    if model == "py3langid":
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise CurationError("blocks.language.model=py3langid needs the py3langid package: pip install "
                                "py3langid (part of herd's curate extra)") from None
        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return lambda text: _pair(identifier.classify(text))
    path = resolve(model)
    if not path.is_file():
        raise CurationError(f"blocks.language.model={model}: no such file; give the path of fastText's "
                            "lid.176.bin, or blocks.language.model=py3langid")
    import fasttext

    fasttext_model = fasttext.load_model(str(path))

    def predict(text: str) -> tuple[str, float]:
        labels, probs = fasttext_model.predict(text, k=1)
        return labels[0].removeprefix("__label__"), float(probs[0])

    return predict


def _pair(result: tuple[str, Any]) -> tuple[str, float]:
    return str(result[0]), float(result[1])


class LanguageId(Block):
    """Label each document's language; remove those not kept or under threshold."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.detect = detector(self.options.get("model"))
        keep = self.options.get("keep")
        self.keep = None if keep is None else {str(code) for code in ([keep] if isinstance(keep, str) else keep)}
        thresholds = dict(self.options.get("thresholds") or {})
        self.default = float(thresholds.pop("default", 0.0))
        self.thresholds = {str(code): float(value) for code, value in thresholds.items()}
        self.max_chars = self.number("max_chars", 2000, 1, integer=True)

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Detect, record, and keep or remove each document."""
        found: Counter[str] = Counter()
        for doc in documents():
            language, score = self.detect(doc.text[: self.max_chars].replace("\n", " "))
            doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
            found[language] += 1
            threshold = self.thresholds.get(language, self.default)
            if self.keep is not None and language not in self.keep:
                yield Verdict.remove(doc, "language_not_kept", f"{language} ({score:.2f})")
            elif score < threshold:
                yield Verdict.remove(doc, "language_score_low", f"{language} {score:.2f} < {threshold}")
            else:
                yield Verdict.keep(doc)
        self.notes["languages found"] = dict(found.most_common(12))
