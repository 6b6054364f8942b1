"""Heuristic filters: a repetition-heavy log is removed, a planted token-distribution outlier too, dirty words."""

from __future__ import annotations

import base64
import random

import pytest

from helpers.curation import documents, removed_ids, run_block, stdlib_paragraphs
from herd.curation.blocks import CurationError
from herd.curation.filters import DirtyWords, KLFilter, RepetitionFilter

PROSE_MODULES = ("argparse", "textwrap", "heapq", "fractions", "statistics", "calendar")


def _log(lines: int = 120) -> str:
    rng = random.Random(0)
    return "\n".join(f"2024-05-01 12:{i // 60:02d}:{i % 60:02d} ERROR worker-{rng.randint(1, 3)} connection to "
                     f"db-primary refused, retrying in 5 seconds" for i in range(lines))


def test_the_repetition_filter_removes_a_log_and_keeps_prose(tmp_path):
    prose = stdlib_paragraphs(*PROSE_MODULES, min_words=40)[:20]
    docs = documents([*prose, _log()])
    verdicts = run_block(RepetitionFilter("repetition", {}), docs, tmp_path)
    assert f"web/{len(prose)}" in removed_ids(verdicts)
    # Gopher's thresholds also take docstring paragraphs that repeat themselves (doctests, option lists):
    # 4 of these 20; the rest of the prose stays
    assert len(removed_ids(verdicts)) <= 1 + len(prose) // 4
    log = next(v for v in verdicts if v.doc.id == f"web/{len(prose)}")
    assert log.reason.startswith(("top_", "duplicated_", "dup_"))


def test_the_kl_filter_removes_a_planted_outlier(tmp_path):
    prose = stdlib_paragraphs(*PROSE_MODULES, min_words=40)[:40]
    blob = base64.b64encode(random.Random(1).randbytes(600)).decode()
    outlier = "Attachment follows.\n" + "\n".join(blob[i:i + 76] for i in range(0, len(blob), 76))
    docs = documents([*prose[:20], outlier, *prose[20:]])
    verdicts = run_block(KLFilter("kl", {"mad_k": 5.0}), docs, tmp_path)
    assert removed_ids(verdicts) == {"web/20"}
    assert "KL" in next(v for v in verdicts if v.kept is None).detail


def test_the_kl_filter_measures_each_source_against_its_own_distribution(tmp_path):
    prose = documents(stdlib_paragraphs(*PROSE_MODULES, min_words=40)[:20], source="prose")
    numbers = documents([" ".join(str(random.Random(i).randint(0, 99)) for _ in range(60)) for i in range(20)],
                        source="tables")
    verdicts = run_block(KLFilter("kl", {}), prose + numbers, tmp_path)
    assert removed_ids(verdicts) == set()   # tables of numbers are normal among tables


def test_dirty_words_removes_documents_over_the_ratio(tmp_path):
    word_list = tmp_path / "words.txt"
    word_list.write_text("grumble\nfoul phrase\n")
    docs = documents(["a clean text about gardens " * 10, "grumble grumble this is a foul phrase text " * 5,
                      "one grumble in a long clean text about rivers and stones " * 20])
    verdicts = run_block(DirtyWords("dirty_words", {"word_list": str(word_list), "max_ratio": 0.01}), docs, tmp_path)
    assert removed_ids(verdicts) == {"web/1", "web/2"}   # 3/8 of the words; 20/220 > 1%
    verdicts = run_block(DirtyWords("dirty_words", {"words": ["grumble"], "max_ratio": 0.1}), docs, tmp_path)
    assert removed_ids(verdicts) == {"web/1"}


def test_dirty_words_without_a_list_names_the_options():
    with pytest.raises(CurationError, match="blocks.dirty_words.word_list"):
        DirtyWords("dirty_words", {})
