"""fastText classifiers (quality, knowledge buckets) and language identification."""

from __future__ import annotations

import json

import pytest

from helpers.curation import PLAIN_MODULES, documents, plain_prose, removed_ids, run_block, stdlib_code_chunks
from herd.curation.blocks import CurationError
from herd.curation.classify import FastText, KnowledgeClassifier, QualityClassifier
from herd.curation.language import LanguageId
from herd.curation.mix import bucket_weights, source_weights

ENGLISH = ("When the tables are loaded, the program checks each entry against the rules described in the "
           "previous section and reports the first one that does not match, together with the reason. It is "
           "usually best to correct the entries in the order they are reported.")


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_a_classifier_trained_on_two_clearly_different_classes_separates_held_out_items():
    prose, code = plain_prose(), stdlib_code_chunks(*PLAIN_MODULES, lines=12)
    train = [("prose", t) for t in prose[::2]] + [("code", t) for t in code[::2]]
    model = FastText.train(train, epoch=10)   # 125 prose and 491 code examples, balanced
    held_out = [("prose", t) for t in prose[1::2][:60]] + [("code", t) for t in code[1::2][:60]]
    right = sum(model.best(text)[0] == label for label, text in held_out)
    assert right / len(held_out) >= 0.95, right    # 116 of 120 (what is missed holds code-like text)


def test_the_quality_block_trains_from_labelled_inputs_and_filters_under_its_threshold(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", plain_prose()[:150])
    bad = _jsonl(tmp_path / "bad.jsonl", stdlib_code_chunks(*PLAIN_MODULES, lines=12)[:150])
    block = QualityClassifier("quality", {"examples": {"good": good, "bad": bad}, "epoch": 10, "held_out": 0.2},
                              tmp_path / "models")
    assert float(block.notes["held-out accuracy"].split()[0]) >= 0.9
    assert (tmp_path / "models" / "quality.bin").is_file()
    docs = documents([ENGLISH, stdlib_code_chunks("uuid", lines=12)[-3]])
    verdicts = run_block(block, docs, tmp_path / "work")
    assert removed_ids(verdicts) == {"web/1"}
    assert verdicts[0].doc.metadata["quality"] > 0.5 > verdicts[1].doc.metadata["quality"]
    reloaded = QualityClassifier("quality", {"model": str(tmp_path / "models" / "quality.bin"), "action": "tag"})
    assert removed_ids(run_block(reloaded, docs, tmp_path / "again")) == set()


def test_the_knowledge_block_assigns_buckets_by_source_language_and_classifier(tmp_path):
    general = _jsonl(tmp_path / "general.jsonl", plain_prose()[:120])
    code = _jsonl(tmp_path / "code.jsonl", stdlib_code_chunks(*PLAIN_MODULES, lines=12)[:120])
    block = KnowledgeClassifier("knowledge", {"examples": {"general": general, "code": code}, "epoch": 10,
                                              "source_buckets": {"scripts": "code"}})
    docs = [*documents([stdlib_code_chunks("uuid", lines=12)[2]], source="scripts"),
            *documents(["Le chat dort sur la table de la cuisine."], language="fr"),
            *documents([stdlib_code_chunks("uuid", lines=12)[-3], ENGLISH],
                       source="web2")]
    run_block(block, docs, tmp_path / "work")
    assert [d.metadata["bucket"] for d in docs] == ["code", "multilingual", "code", "general"]


def test_mix_weights_reach_the_target_from_bucket_counts():
    target = {"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08}
    assert bucket_weights({"general": 900, "code": 100, "math": 0}, target) == pytest.approx(
        {"general": 0.5 / 0.67, "code": 0.17 / 0.67})
    # two sources, each a mixture of buckets: the weights that reach 2/3 general, 1/3 code
    weights, reached = source_weights({"web": {"general": 90, "code": 10}, "repo": {"code": 100}},
                                      {"general": 2 / 3, "code": 1 / 3})
    assert reached["general"] == pytest.approx(2 / 3, abs=1e-6)
    assert weights["web"] == pytest.approx(20 / 27, abs=1e-6)


def test_language_id_keeps_listed_languages_over_their_thresholds(tmp_path):
    texts = ["The committee will publish its final report on the river restoration project next spring.",
             "Le comité publiera son rapport final sur le projet de restauration de la rivière au printemps.",
             "Der Ausschuss wird seinen Abschlussbericht über das Projekt im nächsten Frühjahr veröffentlichen.",
             "ok ok"]
    block = LanguageId("language", {"model": "py3langid", "keep": ["en", "fr"], "thresholds": {"en": 0.9}})
    verdicts = run_block(block, documents(texts), tmp_path)
    assert [v.doc.metadata["language"] for v in verdicts[:3]] == ["en", "fr", "de"]
    assert "web/2" in removed_ids(verdicts) and not {"web/0", "web/1"} & removed_ids(verdicts)


def test_language_id_without_a_model_says_what_to_pass():
    with pytest.raises(CurationError, match=r"blocks\.language\.model=py3langid .*lid\.176\.bin"):
        LanguageId("language", {"model": None})
