"""Reading curation inputs: a jsonl line keeps its own id, as herd.prepare reads it."""

from __future__ import annotations

from herd.curation.documents import SourceInput, read_sources
from herd.data.kinds.text import iter_documents


def test_curation_and_prepare_name_a_jsonl_line_by_its_own_id_alike(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "one", "id": "os/path.py"}\n{"text": "two"}\n{"text": "three", "id": [3]}\n')
    bad_curate, bad_prepare = [], []
    curated = list(read_sources([SourceInput("web", [str(path)])], bad_curate.append))
    prepared = list(iter_documents(str(path), on_bad_input=bad_prepare.append))
    assert [d.id for d in curated] == [d.id for d in prepared] == ["os/path.py", "web.jsonl:2"]
    assert [e.location for e in bad_curate] == [e.location for e in bad_prepare] == [f"{path}:3"]
