"""herd.curate end to end: a noisy folder curated, the report written, the output prepared and trained on."""

from __future__ import annotations

import json
import subprocess
import sys

from hydra import compose, initialize_config_dir

from helpers.curation import edit_words, plain_prose, stdlib_code_chunks
from helpers.training import TRAIN_VOCAB, compose_train
from herd.curate import curate
from herd.prepare import prepare
from herd.presets import config_dir
from herd.train import train


def _noisy(root):
    """A jsonl of prose with planted near-duplicates, a log and URL duplicates; a folder of code."""
    prose = list(dict.fromkeys(plain_prose()))[:80]   # the stdlib repeats a few docstrings word for word
    records = [{"text": t, "url": f"site.org/{i}"} for i, t in enumerate(prose)]
    long = ["\n\n".join(prose[i:i + 4]) for i in range(0, 20, 4)]             # 5 documents of 4 paragraphs
    records += [{"text": text} for text in long]
    records += [{"text": edit_words(text, [3, 40]), "url": f"mirror.org/{i}"} for i, text in enumerate(long)]
    records += [{"text": prose[10], "url": "site.org/10"}]                                         # same URL
    records.append({"text": "\n".join(f"12:00:{i:02d} ERROR disk full on /dev/sda1" for i in range(60))})
    (root / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "code").mkdir()
    for i, chunk in enumerate(stdlib_code_chunks("textwrap", "heapq", "csv", lines=40)):
        (root / "code" / f"{i:03d}.py").write_text(chunk)
    return len(records)


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_curated_output_is_prepared_and_trained_on(tmp_path):
    total = _noisy(tmp_path)
    out = tmp_path / "curated"
    sources = (f"+sources={{web: {{input: {tmp_path / 'web.jsonl'}, url_field: url}}, "
               f"code: {{input: {tmp_path / 'code'}}}}}")
    result = curate(_compose("curate", [f"output_dir={out}", "~sources", sources, "blocks.decontaminate.enabled=false"]))
    removed = {s.name: s.removed_documents for s in result.blocks}
    assert removed["url_dedup"] == 1 and removed["minhash"] == 5 and removed["repetition"] >= 1
    web = [json.loads(line) for line in (out / "web.jsonl").read_text().splitlines()]
    assert len(web) <= total - 7 and all("ERROR disk full" not in r["text"] for r in web)
    report = (out / "report.md").read_text()
    assert "| minhash | " in report and "near-duplicate of" in report
    assert json.loads((out / "report.json").read_text())["documents_out"] == result.documents_out

    prepared = tmp_path / "prepared"
    prepare(_compose("prepare", [f"output_dir={prepared}", "~sources",
                                 f"+sources={{prose: {{input: {out / 'web.jsonl'}}}, code: {{input: {out / 'code.jsonl'}}}}}",
                                 "seq_len=64", "val_fraction=0.1", "num_proc=1", "progress=false",
                                 f"tokenizer.vocab_size={TRAIN_VOCAB}", "shards.max_rows=64", "shards.min_count=2"]))
    run = train(compose_train(tmp_path, prepared, "trainer.max_steps=2", "trainer.val_check_interval=2",
                              "export=false"))
    assert run["trainer"].global_step == 2


def test_a_missing_language_model_is_one_line_naming_what_to_pass(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.")
    result = subprocess.run([sys.executable, "-m", "herd.curate", f"output_dir={tmp_path / 'out'}",
                             "~sources", f"+sources={{prose: {{input: {tmp_path / 'a.txt'}}}}}",
                             "blocks.language.model=null"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd.curate: blocks.language.model is not set: pass "
                                                   "blocks.language.model=py3langid")


def test_keep_work_keeps_every_stage_file(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(plain_prose()[:3]))
    out = tmp_path / "out"
    result = curate(_compose("curate", [f"output_dir={out}", "~sources", f"+sources={{prose: {{input: {tmp_path / 'a.txt'}}}}}",
                                        "blocks.decontaminate.enabled=false", "keep_work=true"]))
    (work,) = out.glob(".curate-*")
    stages = sorted(path.name for path in work.glob("*.jsonl"))
    assert stages == ["00-sources.jsonl", *(f"{n:02d}-{s.name}.jsonl" for n, s in enumerate(result.blocks, start=1))]
    assert len(stages) > 2
