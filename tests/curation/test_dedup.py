"""Deduplication blocks: MinHash near-duplicates at the configured Jaccard threshold, URLs, the paper's line rule."""

from __future__ import annotations

from helpers.curation import documents, edit_words, random_text, removed_ids, run_block
from herd.curation.dedup import LineDedup, MinHashDedup, UrlDedup

# LSH this loose (20 bands of 2 rows) makes pairs from Jaccard ~0.3 up candidates, so what is removed is
# decided by the exact check at jaccard_threshold.
LOOSE = {"n_grams": 5, "bands": 20, "rows": 2}


def _planted() -> list[str]:
    """12 distinct texts; then copies of text 0 with 2 words edited, of text 1 with 3 edited, of
    text 2 with 12 edited (Jaccard ~0.6 of 5-word shingles)."""
    texts = [random_text(seed) for seed in range(12)]
    return [*texts, edit_words(texts[0], [10, 90]), edit_words(texts[1], [20, 70, 150]),
            edit_words(texts[2], list(range(5, 200, 17)))]


def test_minhash_removes_near_duplicates_at_the_configured_threshold_and_keeps_distinct_documents(tmp_path):
    docs = documents(_planted())
    verdicts = run_block(MinHashDedup("minhash", {**LOOSE, "jaccard_threshold": 0.8}), docs, tmp_path / "a")
    # one of each near-identical pair goes (the later one), the 12-edit copy is under 0.8 and stays
    assert removed_ids(verdicts) == {"web/12", "web/13"}
    details = {v.doc.id: v.detail for v in verdicts if v.kept is None}
    assert details["web/12"].startswith("near-duplicate of web/0 (Jaccard 0.9")
    assert len(verdicts) == len(docs)

    verdicts = run_block(MinHashDedup("minhash", {**LOOSE, "jaccard_threshold": 0.5}), docs, tmp_path / "b")
    assert removed_ids(verdicts) == {"web/12", "web/13", "web/14"}


def test_minhash_with_the_default_bands_and_rows_catches_few_word_edits(tmp_path):
    docs = documents(_planted())
    verdicts = run_block(MinHashDedup("minhash", {"jaccard_threshold": 0.8}), docs, tmp_path)
    assert removed_ids(verdicts) == {"web/12", "web/13"}


def test_url_dedup_keeps_the_first_or_the_latest_document_of_each_url(tmp_path):
    docs = documents(["old page", "other page", "new page", "no url"])
    for doc, url, day in zip(docs, ["a.com/x", "a.com/y", "a.com/x", None], ["2020-01-01", "2021-01-01",
                                                                             "2023-05-01", None], strict=True):
        if url:
            doc.metadata.update(url=url, date=day)
    first = run_block(UrlDedup("url_dedup", {"keep": "first"}), docs, tmp_path / "first")
    assert removed_ids(first) == {"web/2"}
    latest = run_block(UrlDedup("url_dedup", {"keep": "latest"}), docs, tmp_path / "latest")
    assert removed_ids(latest) == {"web/0"}
    assert {v.doc.id for v in latest} == {"web/0", "web/1", "web/2", "web/3"}


def test_line_dedup_removes_lines_seen_more_than_six_times_and_keeps_rare_ones(tmp_path):
    boilerplate = "Subscribe to our newsletter for weekly updates"
    rare = "This line appears in exactly five documents"
    texts = []
    for i in range(12):
        lines = [random_text(100 + i, 12), boilerplate if i < 7 else random_text(200 + i, 8),
                 rare if i < 5 else random_text(300 + i, 8), "", random_text(400 + i, 10)]
        texts.append("\n".join(lines))
    texts.append(boilerplate + "\n" + boilerplate)          # nothing but boilerplate: removed whole
    docs = documents(texts)
    verdicts = run_block(LineDedup("line_dedup", {}), docs, tmp_path)
    kept = {v.doc.id: v.kept for v in verdicts}
    assert kept["web/12"] is None
    for i in range(12):
        text = kept[f"web/{i}"].text
        assert boilerplate not in text            # 8 occurrences > 6
        assert (rare in text) == (i < 5)          # 5 occurrences: kept
        assert "\n\n" in text                     # blank lines are never removed
    changed = [v for v in verdicts if v.changed]
    assert len(changed) == 7 and all(v.removed_text.strip() == boilerplate for v in changed)


def test_line_dedup_counts_per_bucket_of_documents(tmp_path):
    line = "Posted in the archive of the old forum"
    docs = documents([f"{random_text(i, 10)}\n{line}" for i in range(12)])
    # buckets of 6 documents: 6 occurrences each, not more than 6: kept
    verdicts = run_block(LineDedup("line_dedup", {"bucket_documents": 6}), docs, tmp_path / "six")
    assert not any(v.changed for v in verdicts)
    verdicts = run_block(LineDedup("line_dedup", {"bucket_documents": 12}), docs, tmp_path / "twelve")
    assert sum(v.changed for v in verdicts) == 12
