"""Ranks x workers read disjoint samples that together are the whole split; Lightning resume is exact.

The multi-process tests start real processes (torch DataLoader workers, Lightning DDP over gloo),
so they are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers.synthetic import write_dataset

ROW_LEN = 17
ROWS = 32  # 8 shards of 4 rows: 2 ranks x 2 workers get 2 shards (8 rows) each

# Read the first batches of one rank with 2 DataLoader workers; keep each worker's first pass.
RANK_SCRIPT = """
import json, sys
from herd.data.loaders.packed import PackedDataModule
from herd.data.loaders.stream import pass_order, reader_shards

dm = PackedDataModule(sys.argv[1], {"a": {}}, seq_len=16, batch_size=1, num_workers=2, shuffle_buffer=5)
loader = dm.train_dataloader()
source, plan, rank = loader.dataset.sources[0], loader.dataset.plan, loader.dataset.rank
order = pass_order(source.shards, plan.seed, "a", 0, plan.epoch)
first_pass = [sum(s.rows for s in reader_shards(order, rank, 2, w, 2)) for w in range(2)]
kept = []
for b, batch in enumerate(loader):
    if b >= 2 * max(first_pass):
        break
    if b // 2 < first_pass[b % 2]:  # batch b comes from worker b % 2 (DataLoader round robin)
        kept.append(int(batch["tokens"][0, 0]))
print(json.dumps(kept))
"""

# Lightning DDP on 2 CPU processes (Lightning's own launcher, which sets no RANK variable).
DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from herd.data.loaders.packed import PackedDataModule

class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = []
    def training_step(self, batch, batch_idx):
        self.seen += batch["tokens"][:, 0].tolist()
        return (self.w * batch["tokens"].float().mean()).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
    def on_train_end(self):
        with open(f"{sys.argv[2]}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)

dm = PackedDataModule(sys.argv[1], {"a": {}}, seq_len=16, batch_size=2, num_workers=2, shuffle_buffer=5)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0)
trainer.fit(Recorder(), datamodule=dm)
"""


@pytest.fixture
def even_dataset(tmp_path):
    return write_dataset(tmp_path / "prepared", {"a": (ROWS * ROW_LEN, 0)}, ROW_LEN, shard_rows=4)


def _all_rows():
    return sorted(r * ROW_LEN for r in range(ROWS))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


@pytest.mark.slow
def test_two_ranks_two_workers_read_disjoint_samples_covering_the_split(even_dataset, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(even_dataset)],
            env=_env(RANK=str(rank), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    per_rank = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == _all_rows()


@pytest.mark.slow
def test_lightning_ddp_ranks_read_disjoint_samples_covering_the_split(even_dataset, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    subprocess.run(
        [sys.executable, str(script), str(even_dataset), str(tmp_path)],
        env=_env(),
        check=True,
        timeout=180,
        capture_output=True,
    )
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == ROWS // 2
    assert sorted(per_rank[0] + per_rank[1]) == _all_rows()
