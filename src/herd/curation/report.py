"""The curation report: ``report.md`` for people, ``report.json`` for programs, ``mix.yaml`` for training.

The markdown holds a table of every block (documents and tokens in, removed, changed; time and
documents per second), then a section per block with its removals by reason, a few examples of
what it removed (or cut, for line dedup) and what the block itself noted (LSH settings, classifier
accuracy, languages found, KL limits, contaminated items). With the knowledge classifier it ends
with the data mix: tokens per bucket and the ``data.sources.*.weight`` overrides that reach the
target mix, also written as ``mix.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herd.curation.pipeline import CurationResult

REPORT_FILE = "report.md"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def write_report(result: CurationResult, out: Path) -> Path:
    """Write report.md, report.json (and mix.yaml); returns the markdown file."""
    unit = result.unit
    lines = [
        "# Curation report",
        "",
        f"{result.documents_in:,} documents ({result.tokens_in:,} {unit}) in, {result.documents_out:,} documents "
        f"({result.tokens_out:,} {unit}) out: {_pct(result.documents_out, result.documents_in)} of the documents, "
        f"{_pct(result.tokens_out, result.tokens_in)} of the {unit}.",
        f"{result.seconds:.1f} s in one process ({result.documents_per_second():,.0f} documents/s per core; "
        f"reading and counting {result.read_seconds:.1f} s).",
        "",
    ]
    if result.skipped_inputs:
        lines += [f"Bad inputs skipped: {result.skipped_inputs}", ""]
    lines += ["| block | documents in | removed | " + unit + " removed | changed | " + unit + " cut | s | docs/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result.blocks:
        rate = s.documents_in / s.seconds if s.seconds else 0
        lines.append(f"| {s.name} | {s.documents_in:,} | {s.removed_documents:,} "
                     f"({_pct(s.removed_documents, s.documents_in)}) | {s.removed_tokens:,} "
                     f"({_pct(s.removed_tokens, s.tokens_in)}) | {s.changed_documents:,} | {s.cut_tokens:,} | "
                     f"{s.seconds:.1f} | {rate:,.0f} |")
    lines.append("")
    for s in result.blocks:
        lines += [f"## {s.name}", ""]
        if s.reasons:
            lines += ["By reason: " + ", ".join(f"{reason} {count:,}" for reason, count in s.reasons.most_common()),
                      ""]
        for key, value in s.notes.items():
            lines += _note(key, value)
        for example in s.examples:
            detail = f" ({example['detail']})" if example["detail"] else ""
            lines += [f"- {example['what']} `{example['id']}`, {example['reason']}{detail}:", "",
                      *("  > " + line for line in example["text"].splitlines()[:12]), ""]
        lines.append("")
    if result.mix:
        lines += _mix_section(result.mix)
        (out / "mix.yaml").write_text(_mix_yaml(result.mix))
    lines += ["## Output", "", *(f"- `{path.name}`" for path in result.files.values()), ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    data = {"unit": unit, "documents_in": result.documents_in, "tokens_in": result.tokens_in,
            "documents_out": result.documents_out, "tokens_out": result.tokens_out,
            "seconds": round(result.seconds, 3), "documents_per_second": round(result.documents_per_second(), 1),
            "blocks": [s.as_dict() for s in result.blocks], "mix": result.mix,
            "files": {name: str(p) for name, p in result.files.items()}, "skipped_inputs": result.skipped_inputs}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    return path


def _note(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"{key}:", "", *(f"- {item}" for item in value[:50]),
                *([f"- ... and {len(value) - 50} more"] if len(value) > 50 else []), ""]
    return [f"{key}: {value}", ""]


def _mix_section(mix: dict[str, Any]) -> list[str]:
    lines = ["## Data mix (knowledge classifier)", "",
             "| bucket | tokens | natural share | target | reached | upsampling |", "|---|---:|---:|---:|---:|---:|"]
    for bucket in sorted({*mix["target"], *mix["tokens_per_bucket"]}):
        lines.append(f"| {bucket} | {mix['tokens_per_bucket'].get(bucket, 0):,} | "
                     f"{mix['natural_mix'].get(bucket, 0):.3f} | {mix['target'].get(bucket, 0):.3f} | "
                     f"{mix['reached_mix'].get(bucket, 0):.3f} | {mix['upsampling'].get(bucket, 0):.2f}x |")
    overrides = " ".join(f"data.sources.{name}.weight={weight:.4f}" for name, weight in mix["weights"].items())
    return [*lines, "", f"Weights ({mix['split_by']} sources): `{overrides}` (also in mix.yaml)", ""]


def _mix_yaml(mix: dict[str, Any]) -> str:
    lines = ["# data.sources weights that reach the target mix (herd.curate); merge into a data config", "sources:"]
    lines += [f"  {name}:\n    weight: {weight:.4f}" for name, weight in mix["weights"].items()]
    return "\n".join(lines) + "\n"
