"""Model-based classifiers (paper 3.1.1-3.1.2): fastText quality and knowledge classifiers.

:class:`FastText` trains a fastText supervised model (the ``fasttext`` module of the
``fasttext-numpy2-wheel`` package, the binding datatrove's own fastText filter uses) from
labelled examples, in-process and offline, or loads one (``model:``, e.g. a model trained before
and saved by herd in ``<output_dir>/models/``). Texts are lower-cased and split into words and
punctuation marks, newlines removed, as fastText expects.

- :class:`QualityClassifier`: two or more labels (e.g. ``good``: text a reference work would cite,
  ``bad``: everything else, the paper's "would be referenced by Wikipedia"); each document gets
  ``metadata["quality"]``, the probability of the ``positive`` label. ``action: filter`` removes
  documents under ``threshold``; ``action: tag`` only records it.
- :class:`KnowledgeClassifier`: the same mechanism with the labels of the data mix (``general``,
  ``math``, ``code``, ``multilingual``); each document gets ``metadata["bucket"]``, the most
  probable label. A source can be given a bucket outright (``source_buckets: {code: code}``), and
  documents that the language block found not to be in ``languages`` (default ``[en]``) go to
  ``multilingual_bucket``. The pipeline turns the buckets' token counts into data-mix weights
  (:mod:`herd.curation.mix`).

Labelled examples are ``examples: {label: input or [inputs]}`` with inputs as the sources take
them (files, folders, jsonl, ``stdlib:prose``...). A fraction ``held_out`` of each label (by a hash
of the document id) is kept out of training, and the block reports the classifier's accuracy on
it.
"""

from __future__ import annotations

import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from herd.curation.blocks import Block, CurationError, Documents, Verdict
from herd.curation.documents import WORD, Document, SourceInput, read_sources
from herd.data.inputs import raise_bad_input
from herd.paths import resolve

_LABEL = "__label__"


def fasttext_text(text: str, max_words: int = 2000) -> str:
    """``text`` as fastText reads it: lower-cased words and punctuation marks on one line."""
    return " ".join(WORD.findall(text.lower())[:max_words])


class FastText:
    """A fastText supervised classifier: :meth:`train` or :meth:`load`, then :meth:`predict`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.labels = [label.removeprefix(_LABEL) for label in model.labels]

    @classmethod
    def train(cls, examples: Iterable[tuple[str, str]], *, epoch: int = 25, lr: float = 0.5,
              word_ngrams: int = 2, dim: int = 32, min_count: int = 1, seed: int = 0,
              balance: bool = True) -> FastText:
        """Train on ``(label, text)`` pairs (one thread, so the same examples give the same model).

        With ``balance`` the examples of each label are repeated up to the count of the largest
        label (fastText has no class weights), so a small label is not drowned.
        """
        fasttext = _fasttext()
        by_label: dict[str, list[str]] = {}
        for label, text in examples:
            by_label.setdefault(label, []).append(fasttext_text(text))
        if len(by_label) < 2:
            raise CurationError(f"a classifier needs examples of at least two labels, got "
                                f"{ {label: len(texts) for label, texts in by_label.items()} }")
        largest = max(len(texts) for texts in by_label.values())
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as file:
            for label, texts in by_label.items():
                for i in range(largest if balance else len(texts)):
                    file.write(f"{_LABEL}{label} {texts[i % len(texts)]}\n")
        try:
            model = fasttext.train_supervised(input=file.name, epoch=epoch, lr=lr, wordNgrams=word_ngrams,
                                              dim=dim, minCount=min_count, thread=1, seed=seed, verbose=0)
        finally:
            Path(file.name).unlink(missing_ok=True)
        return cls(model)

    @classmethod
    def load(cls, path: str | Path) -> FastText:
        """A fastText ``.bin`` model from disk."""
        path = resolve(str(path))
        if not path.is_file():
            raise FileNotFoundError(f"fastText model {path} not found; give the path of a .bin model, or "
                                    "labelled examples to train one")
        return cls(_fasttext().load_model(str(path)))

    def save(self, path: Path) -> Path:
        """Save the model (``.bin``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model.save_model(str(path))
        return path

    def predict(self, text: str) -> dict[str, float]:
        """Each label's probability for ``text``."""
        labels, probs = self.model.predict(fasttext_text(text), k=-1)
        return {label.removeprefix(_LABEL): float(p) for label, p in zip(labels, probs, strict=True)}

    def best(self, text: str) -> tuple[str, float]:
        """The most probable label and its probability."""
        scores = self.predict(text)
        label = max(scores, key=scores.__getitem__)
        return label, scores[label]


def _fasttext():
    try:
        import fasttext
    except ImportError:  # pragma: no cover - the curate extra installs it
        raise CurationError("the classifiers need fastText: pip install fasttext-numpy2-wheel "
                            "(part of herd's curate extra)") from None
    return fasttext


def _held_out(doc_id: str, fraction: float) -> bool:
    return zlib.crc32(doc_id.encode("utf-8")) % 10_000 < fraction * 10_000


class _Classifier(Block):
    """Trains or loads its fastText model when built; see the module docstring."""

    def __init__(self, name: str, options: Mapping[str, Any], models_dir: Path | None = None) -> None:
        super().__init__(name, options)
        self.held_out = self.number("held_out", 0.1, 0, 0.9)
        if self.options.get("model"):
            self.classifier = FastText.load(self.options["model"])
            self.notes["model"] = str(self.options["model"])
        elif self.options.get("examples"):
            self.classifier = self._train(self.options["examples"])
            if models_dir is not None:
                self.notes["model"] = str(self.classifier.save(models_dir / f"{name}.bin"))
        else:
            raise CurationError(f"blocks.{name} needs a model: set blocks.{name}.examples ({{label: input}}, "
                                f"labelled examples to train on) or blocks.{name}.model (a fastText .bin), or "
                                f"blocks.{name}.enabled=false")

    def _train(self, examples: Mapping[str, Any]) -> FastText:
        if not isinstance(examples, Mapping) or len(examples) < 2:
            raise CurationError(f"blocks.{self.name}.examples must map at least two labels to inputs, got "
                                f"{examples!r}")
        sources = [SourceInput(str(label), [item] if isinstance(item, str) else [str(i) for i in item])
                   for label, item in examples.items()]
        sources = [SourceInput(s.name, [i if i.startswith("stdlib:") else str(resolve(i)) for i in s.inputs])
                   for s in sources]
        train, test = [], []
        for doc in read_sources(sources, raise_bad_input):
            if doc.text.strip():
                (test if _held_out(doc.id, self.held_out) else train).append((doc.metadata["source"], doc.text))
        options = {key: self.options[key] for key in ("epoch", "lr", "word_ngrams", "dim", "seed", "balance")
                   if self.options.get(key) is not None}
        model = FastText.train(train, **options)
        self.notes["trained on"] = dict(Counter(label for label, _ in train))
        if test:
            right = sum(model.best(text)[0] == label for label, text in test)
            self.notes["held-out accuracy"] = f"{right / len(test):.3f} on {len(test)} examples"
        return model


class QualityClassifier(_Classifier):
    """A quality score per document, optionally a filter; see the module docstring."""

    def __init__(self, name: str, options: Mapping[str, Any], models_dir: Path | None = None) -> None:
        super().__init__(name, options, models_dir)
        self.positive = str(self.option("positive", "good"))
        if self.positive not in self.classifier.labels:
            raise CurationError(f"blocks.{name}.positive={self.positive!r} is not a label of the classifier "
                                f"({self.classifier.labels})")
        self.threshold = self.number("threshold", 0.5, 0, 1)
        self.action = self.option("action", "filter")
        if self.action not in ("filter", "tag"):
            raise CurationError(f"blocks.{name}.action must be 'filter' or 'tag', got {self.action!r}")

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Score every document; remove those under the threshold (``action: filter``)."""
        for doc in documents():
            score = self.classifier.predict(doc.text).get(self.positive, 0.0)
            doc.metadata["quality"] = round(score, 4)
            if self.action == "filter" and score < self.threshold:
                yield Verdict.remove(doc, "low_quality", f"P({self.positive}) = {score:.2f} < {self.threshold}")
            else:
                yield Verdict.keep(doc)


class KnowledgeClassifier(_Classifier):
    """A data-mix bucket per document; see the module docstring."""

    def __init__(self, name: str, options: Mapping[str, Any], models_dir: Path | None = None) -> None:
        self.source_buckets = dict(options.get("source_buckets") or {})
        super().__init__(name, options, models_dir)
        self.languages = set(self.option("languages", ["en"]))
        self.multilingual = self.option("multilingual_bucket", "multilingual")

    def run(self, documents: Documents, work: Path) -> Iterator[Verdict]:
        """Label every document with its bucket; nothing is removed."""
        counts: Counter[str] = Counter()
        for doc in documents():
            doc.metadata["bucket"] = bucket = self.bucket(doc)
            counts[bucket] += 1
            yield Verdict.keep(doc)
        self.notes["documents per bucket"] = dict(sorted(counts.items()))

    def bucket(self, doc: Document) -> str:
        """The document's bucket: its source's, the multilingual one, or the classifier's."""
        source = doc.metadata.get("source")
        if source in self.source_buckets:
            return str(self.source_buckets[source])
        language = doc.metadata.get("language")
        if language is not None and language not in self.languages:
            return str(self.multilingual)
        return self.classifier.best(doc.text)[0]
