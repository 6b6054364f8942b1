"""Scale-out on CPU with gloo: DDP, FSDP2, FSDP2 + tensor parallel, sharded checkpoints, two nodes, 8B on meta."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.training import compose_train
from herd.train import ConfigError, build

SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256",
         "data=synthetic", "data.seq_len=64", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
         "trainer.enable_model_summary=false", "callbacks.text_samples=null", "trainer.log_every_n_steps=1",
         "trainer.precision=32-true", "logger=csv", "validate_first=false", "stage.optimizer.lr=1e-2",
         "stage.scheduler.total_steps=6",
         "stage.scheduler.warmup_steps=2", "trainer.val_check_interval=100", "callbacks.final_validation=null"]
GLOBAL_BATCH = 8


def run(run_dir: Path, *overrides: str, steps: int = 6) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "herd.train", *SMALL, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}",
           f"paths.log_dir={run_dir.parent}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(run_dir, f"data.batch_size={GLOBAL_BATCH}")
    curve = losses(run_dir)
    assert curve[-1] < curve[0] - 0.1  # it learns, so matching curves mean something
    return curve


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2_tp", "fsdp2_cp"])
def test_two_processes_match_one_process(tmp_path, single_process, strategy):
    # fsdp2_tp (fsdp2_cp) on 2 ranks = 1 data-parallel rank x tensor (context) parallel 2: each rank reads the
    # whole batch; under context parallelism each computes half of every row.
    per_rank = GLOBAL_BATCH if strategy in ("fsdp2_tp", "fsdp2_cp") else GLOBAL_BATCH // 2
    run(tmp_path / "run", f"strategy={strategy}", "trainer.devices=2", f"data.batch_size={per_rank}")
    assert losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-4)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_and_consolidates_for_transformers(tmp_path, single_process):
    from transformers import AutoModelForCausalLM

    first, second = tmp_path / "first", tmp_path / "second"
    fsdp2 = ["strategy=fsdp2", "trainer.devices=2", f"data.batch_size={GLOBAL_BATCH // 2}",
             "callbacks.last_checkpoint.every_n_train_steps=3"]
    run(first, *fsdp2, "export=false", steps=3)
    checkpoint = first / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per rank
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.ckpt"]  # no temporary left beside it
    run(second, *fsdp2, f"ckpt_path={checkpoint}", steps=6)
    assert losses(second) == pytest.approx(single_process[3:], rel=1e-4)  # the curve goes on where it stopped

    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "herd.export", f"checkpoint={second / 'checkpoints' / 'last.ckpt'}",
                    f"output={out}", f"hydra.run.dir={tmp_path / 'export_log'}"], check=True, capture_output=True,
                   timeout=300)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from herd.interop import hf

    final = hf.load(second / "export").eval()  # what the run itself exported at its end
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (reference(tokens).logits - final(tokens)).abs().max() < 1e-5


@pytest.mark.slow
def test_a_context_parallel_checkpoint_resumes_as_data_parallel_ranks(tmp_path, single_process):
    # the same 2 ranks, first sharing every row (CP 2), then reading half the rows each (FSDP2 data parallel 2):
    # FSDP2 shards over data x context either way, so the sharded checkpoint loads as it is
    first, second = tmp_path / "first", tmp_path / "second"
    run(first, "strategy=fsdp2_cp", "trainer.devices=2", f"data.batch_size={GLOBAL_BATCH}", "export=false",
        "callbacks.last_checkpoint.every_n_train_steps=3", steps=3)
    checkpoint = first / "checkpoints" / "last.ckpt"
    run(second, "strategy=fsdp2", "trainer.devices=2", f"data.batch_size={GLOBAL_BATCH // 2}", "export=false",
        f"ckpt_path={checkpoint}", "resume_with_changes=true", steps=6)
    assert losses(first) == pytest.approx(single_process[:3], rel=1e-4)
    assert losses(second) == pytest.approx(single_process[3:], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_and_write_one_set_of_logs(tmp_path):
    log_dir, port = tmp_path / "logs", free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-id=test-job",
               "-m", "herd.train", *SMALL, "trainer.max_steps=4", "strategy=ddp", "trainer.num_nodes=2",
               "trainer.devices=1", f"data.batch_size={GLOBAL_BATCH // 2}", f"paths.log_dir={log_dir}"]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    runs = list((log_dir / "pretrain" / "runs").iterdir())
    assert [r.name for r in runs] == ["torchrun-test-job"]  # both nodes share one run folder
    assert len(list(runs[0].rglob("metrics.csv"))) == 1 and (runs[0] / "export" / "model.safetensors").is_file()
    with open(runs[0] / "csv" / "metrics.csv") as f:
        tokens = [float(r["train/tokens_seen"]) for r in csv.DictReader(f) if r.get("train/tokens_seen")]
    assert tokens[-1] == 4 * GLOBAL_BATCH * 64  # two nodes' batches counted together


def test_fsdp1_on_cpu_fails_early_pointing_at_fsdp2(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "strategy=fsdp")
    with pytest.raises(ConfigError, match="use strategy=fsdp2"):
        build(cfg)


def _shard_8b(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from herd.model import Transformer
    from herd.presets import model_preset
    from herd.stages.parallelize import apply_fsdp, local_parameter_count

    with torch.device("meta"):
        model = Transformer(model_preset("llama3_8b"))
    apply_fsdp(model, init_device_mesh("cpu", (world,)))
    meta = all(p.to_local().is_meta for p in model.parameters())
    (out / f"rank{rank}.txt").write_text(f"{local_parameter_count(model)} {meta}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_8b_preset_shards_on_meta_across_two_ranks(tmp_path):
    import resource

    torch.multiprocessing.spawn(_shard_8b, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    counts = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert all(flag == "True" for _, flag in counts)  # nothing was allocated
    per_rank = [int(n) for n, _ in counts]
    assert sum(per_rank) == 8_030_261_248
    assert all(abs(n - 8_030_261_248 / 2) / (8_030_261_248 / 2) < 0.001 for n in per_rank)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 1024**2  # KiB: far below 32 GB of fp32
