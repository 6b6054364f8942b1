"""herd.train end to end: compose, instantiate, fit, export; every config group; bad overrides."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir
from herd.train import ConfigError, build, train
from training import compose_train


def test_fast_dev_run_of_the_default_config_exports_a_model(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "debug=fast")
    result = train(cfg)
    assert result["trainer"].global_step == 1
    export = tmp_path / "logs" / "run" / "export"
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    assert math.isfinite(result["metrics"]["train/loss"])


def test_loss_falls_over_50_steps_and_export_matches_transformers(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=50", "trainer.val_check_interval=50",
                        "stage.scheduler.warmup_steps=5", "stage.optimizer.lr=3e-3", "callbacks.text_samples=null")
    result = train(cfg)
    start, end = result["start"]["val/loss"], result["metrics"]["val/loss"]
    assert start == pytest.approx(math.log(512), abs=0.3)  # an untrained model guesses uniformly
    assert end < start - 1.0
    assert result["metrics"]["val/perplexity"] == pytest.approx(math.exp(end), rel=1e-4)

    model = result["stage"].model.float().eval()
    reference = AutoModelForCausalLM.from_pretrained(result["export_dir"], dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (reference(tokens).logits - model(tokens)).abs().max() < 1e-4
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result["export_dir"])
    prompt = tokenizer("def main(", return_tensors="pt")
    generated = reference.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def group_options():
    for group in ("model", "data", "stage", "trainer", "strategy", "logger", "callbacks", "debug"):
        for path in sorted((config_dir() / group).glob("*.yaml")):
            yield group, path.stem


# The paper's four-source mix, served here by the fixture's two sources.
MIX_ON_FIXTURE = ["+data.sources.general.source=prose", "+data.sources.math.source=prose",
                  "+data.sources.multilingual.source=prose", "+data.sources.code.source=code"]


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_config_group_option_composes_and_instantiates(tmp_path, prepared_corpus, group, option):
    overrides = [f"{group}={option}"] + (MIX_ON_FIXTURE if option == "llama3_mix" else [])
    cfg = compose_train(tmp_path, None if option == "synthetic" else prepared_corpus, *overrides)
    if group == "model":  # the preset's own fields (RoPE scaling, attention backend...) on a small shape
        assert cfg.model.dim == 64 and cfg.model.vocab_size == 512
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.precision == "bf16-mixed"
        return
    if option == "fsdp" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="strategy=fsdp2"):
            build(cfg)
        return
    objects = build(cfg)
    assert objects["trainer"] is not None and objects["stage"] is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_runs_with_fast_dev_run(tmp_path, prepared_corpus, experiment):
    # Experiments for GPU clusters run here on the tiny shape, one CPU process and the fixture data.
    on_cpu = ["trainer=cpu", "trainer.devices=1", "trainer.num_nodes=1", "strategy=auto", "data=stdlib"]
    cfg = compose_train(tmp_path, prepared_corpus, f"experiment={experiment}", *on_cpu, "debug=fast")
    if cfg.callbacks.get("context_schedule"):  # 128K contexts do not fit a CPU test: same stages, shorter
        schedule = cfg.callbacks.context_schedule
        OmegaConf.set_struct(schedule, False)
        short = [{"seq_len": 128, "tokens": 2048}, {"seq_len": 256, "tokens": 4096}]
        schedule.stages = [{**{k: v for k, v in stage.items() if k not in ("seq_len", "tokens", "batch_size")},
                            **s} for stage, s in zip(OmegaConf.to_container(schedule.stages), short, strict=False)]
        schedule.tokens_per_batch, schedule.short_seq_len = 1024, 64
        schedule.needle = {**schedule.needle, "lengths": [128, 256], "trials": 1}
    for name, source in cfg.data.get("sources", {}).items():
        if name.startswith("passkey"):  # the synthetic retrieval sources, served here by the fixture's prose
            OmegaConf.set_struct(source, False)
            source.data_dir, source.source = str(prepared_corpus), "prose"
    if OmegaConf.is_missing(cfg.stage, "init_from"):  # stages that continue a model get a small one
        start = tmp_path / "start_model"
        hf.save(Transformer(ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))), start)
        cfg.stage.init_from = str(start)
    result = train(cfg)
    assert result["trainer"].global_step == 1
    assert math.isfinite(result["metrics"]["train/loss"])


@pytest.mark.parametrize(
    ("override", "error", "named"),
    [
        ("trainer.max_stepz=5", ConfigCompositionException, "trainer.max_stepz"),
        ("model.dim=abc", ConfigError, "model.dim must be a positive integer, got 'abc'"),
        ("data.batch_size=-3", ConfigError, "batch_size"),
        ("stage.optimizer.lr=fast", ConfigError, "lr"),
        ("data.data_dir=/nonexistent/prepared", ConfigError, "/nonexistent/prepared"),
        ("model.n_kv_heads=3", ConfigError, "model.n_kv_heads"),
        ("stage.init_from=/nonexistent/model", ConfigError, "/nonexistent/model"),
    ],
)
def test_bad_overrides_fail_before_training_naming_the_key(tmp_path, prepared_corpus, override, error, named):
    with pytest.raises(error, match=named.replace(".", r"\.").replace("(", r"\(")):
        cfg = compose_train(tmp_path, prepared_corpus, override)
        train(cfg)
    assert not (tmp_path / "logs" / "run" / "checkpoints").exists()
