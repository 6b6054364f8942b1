"""herd.curate: pretraining data curation (Llama 3 paper, section 3.1) before ``herd.prepare``.

    python -m herd.curate                                     # the embedded corpus -> data/curated/stdlib
    python -m herd.curate output_dir=data/curated/web \\
        '~sources' '+sources={web: {input: /data/web.jsonl, url_field: url}, code: {input: /data/code}}'
    python -m herd.curate blocks.minhash.jaccard_threshold=0.7 blocks.kl.enabled=false
    python -m herd.curate blocks.language.model=/models/lid.176.bin 'blocks.language.keep=[en, fr]'

It reads the sources ``herd.prepare`` reads (jsonl, text files, folders, ``stdlib:prose`` /
``stdlib:code``), runs the blocks of ``order`` that are enabled (URL and MinHash dedup, line dedup,
repetition, quality, dirty-word and KL filters, language identification, fastText quality and
knowledge classifiers, decontamination; see configs/curate.yaml and :mod:`herd.curation`), and
writes ``<output_dir>/<source>.jsonl`` (or one file per knowledge bucket), ``report.md``,
``report.json`` and, with the knowledge classifier, ``mix.yaml``. Prepare the result with

    python -m herd.prepare output_dir=data/prepared/curated '~sources' \\
        '+sources={prose: {input: data/curated/stdlib/prose.jsonl}, code: {input: data/curated/stdlib/code.jsonl}}'

A bad option or input is reported as one line, ``herd.curate: <message>``, with exit status 2.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # datatrove draws tqdm bars while reading its own stage files

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from herd.cli import user_errors  # noqa: E402
from herd.curation import run_curation  # noqa: E402
from herd.presets import config_dir  # noqa: E402


def curate(cfg: DictConfig):
    """Run the configured curation; returns :class:`herd.curation.CurationResult`."""
    return run_curation(OmegaConf.to_container(cfg, resolve=True))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="curate")
def main(cfg: DictConfig) -> None:
    """Command-line entry; errors are one line with exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("herd.curate"):
        result = curate(cfg)
    print(f"herd.curate: {result.documents_in:,} documents in, {result.documents_out:,} out "
          f"({result.tokens_out:,} of {result.tokens_in:,} {result.unit}); "
          f"{result.documents_per_second():,.0f} documents/s per core")
    for stats in result.blocks:
        print(f"  {stats.name:<14} removed {stats.removed_documents:>7,} documents ({stats.removed_tokens:,} "
              f"{result.unit}), changed {stats.changed_documents:,} ({stats.cut_tokens:,} {result.unit} cut)")
    print(f"  output: {', '.join(str(p) for p in result.files.values())}")
    print(f"  report: {result.report}")


if __name__ == "__main__":
    main()
