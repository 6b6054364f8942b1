"""herd.train end to end: compose, instantiate, fit, export; every config group; bad overrides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers.training import PREFERENCE_SEQ_LEN, compose_train
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir
from herd.train import ConfigError, build, tensorboard_dir, train


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
def test_every_config_group_option_composes_and_instantiates(tmp_path, prepared_corpus, group, option, request):
    overrides = [f"{group}={option}"] + (MIX_ON_FIXTURE if option == "llama3_mix" else [])
    media = {"images": "prepared_images", "speech": "prepared_speech"}
    data = request.getfixturevalue(media[option]) if option in media else prepared_corpus
    cfg = compose_train(tmp_path, None if option == "synthetic" else data, *overrides)
    if group == "model":  # the preset's own fields (RoPE scaling, attention backend...) on a small shape
        assert cfg.model.dim == 64 and cfg.model.vocab_size == 512
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.precision == "bf16-mixed"
        return
    if option == "checkpoint" or (group == "stage" and get_class(cfg.stage._target_).continues_model):
        # these need a model to start from
        shape = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                 if v is not None and k != "from_checkpoint"}
        start = hf.save(Transformer(ModelConfig.from_dict(shape)), tmp_path / "start")
        cfg.stage.init_from = str(start)
    if option == "fsdp" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="strategy=fsdp2"):
            build(cfg)
        return
    objects = build(cfg)
    assert objects["trainer"] is not None and objects["stage"] is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_runs_with_fast_dev_run(tmp_path, prepared_corpus, prepared_preferences, experiment, request):
    # Experiments for GPU clusters run here on the tiny shape, one CPU process and the fixture data.
    on_cpu = ["trainer=cpu", "trainer.devices=1", "trainer.num_nodes=1", "strategy=auto", "data=stdlib"]
    cfg = compose_train(tmp_path, prepared_corpus, f"experiment={experiment}", *on_cpu, "debug=fast")
    if OmegaConf.is_dict(cfg.trainer.strategy) and "_target_" not in cfg.trainer.strategy:
        # an experiment that sizes its strategy (llama3_long_context: context_parallel_size) keeps only that
        # key over strategy=auto: one CPU process runs it without any parallelism
        cfg.trainer.strategy = "auto"
    if cfg.callbacks.get("context_schedule"):  # 128K contexts do not fit a CPU test: same stages, shorter
        schedule = cfg.callbacks.context_schedule
        OmegaConf.set_struct(schedule, False)
        short = [{"seq_len": 128, "tokens": 2048}, {"seq_len": 256, "tokens": 4096}]
        kept = [{k: v for k, v in stage.items() if k not in ("seq_len", "tokens", "batch_size", "context_parallel")}
                for stage in OmegaConf.to_container(schedule.stages)]
        schedule.stages = [{**stage, **s} for stage, s in zip(kept, short, strict=False)]
        schedule.tokens_per_batch, schedule.short_seq_len = 1024, 64
        schedule.needle = {**schedule.needle, "lengths": [128, 256], "trials": 1}
    for name, source in (cfg.data.get("sources") or {}).items():
        if name.startswith(("passkey", "candidate")):  # retrieval sources and anneal_valuation's candidate data,
            # served here by the fixture's prose
            OmegaConf.set_struct(source, False)
            source.data_dir, source.source = str(prepared_corpus), "prose"
    if cfg.stage._target_.endswith(("RewardStage", "DPOStage")):  # they train on rankings
        cfg.data.data_dir, cfg.data.seq_len = str(prepared_preferences), PREFERENCE_SEQ_LEN
    for stage, data, fixture in (("VisionAdapterStage", "images", "prepared_images"),  # image-caption examples
                                 ("SpeechAdapterStage", "speech", "prepared_speech")):  # audio-transcript examples
        if cfg.stage._target_.endswith(stage):
            cfg.data = OmegaConf.merge(OmegaConf.load(config_dir() / "data" / f"{data}.yaml"),
                                       {"data_dir": str(request.getfixturevalue(fixture)), "num_workers": 0})
    if get_class(cfg.stage._target_).continues_model:  # stages that continue a model get a small one
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


# ------------------------------------------------------------------ checks before any work is done


@pytest.fixture(scope="module")
def two_step_checkpoint(tmp_path_factory, prepared_corpus):
    """A finished 2-step run's last.ckpt (trainer.max_steps=2)."""
    root = tmp_path_factory.mktemp("two_steps")
    cfg = compose_train(root, prepared_corpus, "trainer.max_steps=2", "callbacks.last_checkpoint.every_n_train_steps=2",
                        "callbacks.text_samples=null", "validate_first=false", "export=false")
    train(cfg)
    return root / "logs" / "run" / "checkpoints" / "last.ckpt"


def test_max_steps_zero_is_refused_naming_the_key(tmp_path, prepared_corpus):
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=0"):
        train(compose_train(tmp_path, prepared_corpus, "trainer.max_steps=0"))
    assert not (tmp_path / "logs" / "run").exists()


def test_resuming_a_finished_checkpoint_says_how_to_continue(tmp_path, prepared_corpus, two_step_checkpoint):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=2", f"ckpt_path={two_step_checkpoint}")
    with pytest.raises(ConfigError, match=r"at step 2, so it already reached trainer\.max_steps=2.*raise trainer\.max_steps"):
        train(cfg)
    assert not (tmp_path / "logs" / "run" / "export").exists()


def test_a_run_stopped_after_its_last_checkpoint_is_finished_without_training(tmp_path, prepared_corpus):
    """A run killed after its checkpoint at max_steps but before its export (a pipeline step stopped there):
    the same command with resume=auto finishes it: the export holds the checkpoint's weights, the final
    validation is in the metrics and the logs, and no step is trained again."""
    import csv

    from herd.pipeline import training_metrics

    run = ["trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.last_checkpoint.every_n_train_steps=4",
           "trainer.log_every_n_steps=1", "callbacks.text_samples=null", "logger=many",
           "+logger.csv.flush_logs_every_n_steps=1"]
    # what a kill after the last save leaves: the checkpoint at step 4 and the logs, no export
    stopped = train(compose_train(tmp_path, prepared_corpus, *run, "export=false"))
    trained = {k: v.detach().clone() for k, v in stopped["stage"].model.state_dict().items()}
    folder = tmp_path / "logs" / "run"
    assert (folder / "checkpoints" / "last.ckpt").is_file() and not (folder / "export").exists()

    result = train(compose_train(tmp_path, prepared_corpus, *run, "resume=auto"))
    assert result["resume"].step == 4 and result["finished_only"]
    assert result["trainer"].global_step == 4
    assert result["metrics"]["val/loss"] == pytest.approx(stopped["metrics"]["val/loss"], rel=1e-5)
    exported = hf.load(result["export_dir"]).state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(exported[name].float(), value.float(), msg=name)
    with open(folder / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(steps) == [0, 1, 2, 3]  # each trained step logged once, none trained again
    logged = training_metrics(folder / "tensorboard")  # what herd.pipeline reads from a finished step
    assert logged["val/loss"] == pytest.approx(stopped["metrics"]["val/loss"], rel=1e-5)
    assert logged["train/loss"] == pytest.approx(stopped["metrics"]["train/loss"], rel=1e-5)
    assert "val/loss@start" in logged


def test_the_tensorboard_hint_names_a_folder_that_holds_the_runs_events(tmp_path):
    cfg = OmegaConf.create({"paths": {"log_dir": str(tmp_path / "logs")}, "task": "sft"})
    own_run = tmp_path / "logs" / "sft" / "runs" / "2026-01-01_00-00-00"
    assert tensorboard_dir(cfg, own_run) == tmp_path / "logs" / "sft"  # every run of the task
    step = tmp_path / "logs" / "pipeline" / "tiny" / "round1" / "sft"  # herd.pipeline: paths.log_dir=<step folder>
    assert tensorboard_dir(OmegaConf.create({"paths": {"log_dir": str(step)}, "task": "tiny_sft"}), step) == step


@pytest.mark.parametrize(("override", "fields"), [
    ("model.n_heads=2", ["model.n_heads: 4 (checkpoint) vs 2 (config)", "model.head_dim: 16 (checkpoint) vs 32"]),
    ("model.n_layers=3", ["model.n_layers: 2 (checkpoint) vs 3 (config)"]),
    ("model.norm_eps=1e-6", ["model.norm_eps"]),
])
def test_resuming_another_model_shape_lists_the_differing_fields(tmp_path, prepared_corpus, two_step_checkpoint,
                                                                 override, fields):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=4", f"ckpt_path={two_step_checkpoint}", override)
    with pytest.raises(ConfigError, match="holds a different model") as error:
        train(cfg)
    for field in fields:
        assert field in str(error.value)


def test_resuming_with_a_context_change_is_allowed(tmp_path, prepared_corpus, two_step_checkpoint):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=3", f"ckpt_path={two_step_checkpoint}",
                        "model.rope_theta=1000000.0", "callbacks.text_samples=null", "export=false")
    assert train(cfg)["trainer"].global_step == 3


def test_a_requeue_continues_only_its_own_runs_checkpoints(tmp_path, prepared_corpus, two_step_checkpoint, caplog):
    """Run B (HERD_RUN_ID=run-b) was killed before its first checkpoint; run A of the same task has one. The
    requeue of B with resume=auto starts fresh, and says so; resume=latest (or ckpt_path) adopts another
    run's checkpoint, after checking it against the config."""
    import logging
    import shutil

    runs = tmp_path / "logs" / "pretrain" / "runs"
    (runs / "run-a" / "checkpoints").mkdir(parents=True)
    shutil.copy(two_step_checkpoint, runs / "run-a" / "checkpoints" / "last.ckpt")
    (runs / "run-b").mkdir()
    (runs / "run-b" / "train.log").write_text("the first attempt of run B, killed before any checkpoint\n")
    run = ["trainer.max_steps=2", "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.text_samples=null",
           "validate_first=false", "export=false"]
    with caplog.at_level(logging.INFO, logger="herd"):
        result = train(compose_train(tmp_path, prepared_corpus, *run, "resume=auto", run_dir=runs / "run-b"))
    assert result["resume"] is None and result["trainer"].global_step == 2
    assert (f"resume=auto: no complete last.ckpt in this run's folder {runs / 'run-b'}; starting fresh; other runs "
            f"of task 'pretrain' have checkpoints (the newest: {runs / 'run-a' / 'checkpoints' / 'last.ckpt'}), which "
            "resume=auto never continues") in caplog.text
    latest = compose_train(tmp_path, prepared_corpus, *run, "resume=latest", "trainer.max_steps=3", run_dir=runs / "run-c")
    result = train(latest)
    # the newest last.ckpt of the task is now run B's own
    assert result["resume"].path == str(runs / "run-b" / "checkpoints" / "last.ckpt") and result["resume"].step == 2
    assert result["trainer"].global_step == 3
    changed = compose_train(tmp_path, prepared_corpus, *run, "resume=latest", "trainer.max_steps=3", "seed=7",
                            run_dir=runs / "run-d")
    with pytest.raises(ConfigError, match="seed: 1234 \\(checkpoint\\) vs 7 \\(config\\)"):
        train(changed)


def test_resuming_with_settings_that_change_the_run_is_refused_listing_them(tmp_path, prepared_corpus,
                                                                              two_step_checkpoint):
    """Beyond the model's shape: the seed, the optimizer, the schedule, the data, the stage's hyperparameters.
    resume_with_changes=true continues anyway; what users change on purpose needs no flag."""
    run = [f"ckpt_path={two_step_checkpoint}", "callbacks.text_samples=null", "export=false", "validate_first=false"]
    cfg = compose_train(tmp_path, prepared_corpus, *run, "trainer.max_steps=3", "seed=7", "stage.optimizer.lr=0.01",
                        "stage.scheduler.warmup_steps=5", "data.batch_size=4")
    with pytest.raises(ConfigError, match="was trained with other settings than this run's config") as error:
        train(cfg)
    message = str(error.value)
    for difference in ("seed: 1234 (checkpoint) vs 7 (config)", "data.seed: 1234 (checkpoint) vs 7 (config)",
                       "stage.optimizer.lr: 0.003 (checkpoint) vs 0.01 (config)",
                       "stage.scheduler.warmup_steps: 30 (checkpoint) vs 5 (config)",
                       "data.batch_size: 8 (checkpoint) vs 4 (config)", "resume_with_changes=true"):
        assert difference in message, difference
    assert "max_steps:" not in message and "\n" not in message
    cfg = compose_train(tmp_path, prepared_corpus, *run, "trainer.max_steps=3", "seed=7", "resume_with_changes=true")
    assert train(cfg)["trainer"].global_step == 3
    cfg = compose_train(tmp_path, prepared_corpus, *run, "trainer.max_steps=4", "trainer.val_check_interval=1",
                        "trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=1",
                        "stage.on_nonfinite=skip_step", "data.num_workers=0")
    assert train(cfg)["trainer"].global_step == 4


def test_a_checkpoint_from_before_allow_random_init_resumes_without_a_difference():
    """stage.allow_random_init (new in the config) changes nothing a resume continues: it is not listed."""
    from herd.train import run_differences

    old = {"seed": 1, "stage": {"init_from": "/m", "optimizer": {"lr": 0.1}}}
    new = {"seed": 1, "stage": {"init_from": "/m", "allow_random_init": False, "optimizer": {"lr": 0.1}}}
    assert run_differences(old, new) == []
    assert run_differences(old, {**new, "seed": 2}) == ["seed: 1 (checkpoint) vs 2 (config)"]


def model_directory(tmp_path, prepared_corpus, tokenizer_dir=None):
    """A random model of the tests' shape saved as a Hugging Face directory, with the given tokenizer folder."""
    cfg = compose_train(tmp_path, prepared_corpus)
    config = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    return hf.save(Transformer(config), tmp_path / "start", tokenizer=tokenizer_dir)


def test_a_model_directory_with_another_tokenizer_is_refused(tmp_path, prepared_corpus):
    from herd.data.tokenizer import Tokenizer

    # as many ids as the data's tokenizer, but two byte tokens swap ids: the same ids mean other text
    spec = json.loads((prepared_corpus / "tokenizer" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "other_tokenizer").mkdir()
    (tmp_path / "other_tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    other = Tokenizer.load(tmp_path / "other_tokenizer")
    assert other.vocab_size == Tokenizer.load(prepared_corpus / "tokenizer").vocab_size
    start = model_directory(tmp_path, prepared_corpus, tmp_path / "other_tokenizer")
    data_fingerprint = json.loads((prepared_corpus / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    cfg = compose_train(tmp_path, prepared_corpus, f"stage.init_from={start}", "debug=fast")
    with pytest.raises(ConfigError, match="allow_tokenizer_mismatch=true") as error:
        train(cfg)
    assert other.fingerprint in str(error.value) and data_fingerprint in str(error.value)
    cfg = compose_train(tmp_path, prepared_corpus, f"stage.init_from={start}", "debug=fast",
                        "allow_tokenizer_mismatch=true")
    assert train(cfg)["trainer"].global_step == 1


def test_a_model_directory_with_the_datas_tokenizer_is_accepted(tmp_path, prepared_corpus):
    start = model_directory(tmp_path, prepared_corpus, prepared_corpus / "tokenizer")
    cfg = compose_train(tmp_path, prepared_corpus, f"stage.init_from={start}", "debug=fast")
    assert train(cfg)["trainer"].global_step == 1


@pytest.mark.parametrize(("damaged", "named"), [("tokenizer.json", "is not a valid tokenizer.json"),
                                                ("tokenizer_config.json", "is not valid JSON")])
def test_a_model_directory_with_an_invalid_tokenizer_file_is_refused_naming_it(tmp_path, prepared_corpus, damaged,
                                                                                named):
    start = model_directory(tmp_path, prepared_corpus, prepared_corpus / "tokenizer")
    (start / damaged).write_text("{not json")
    cfg = compose_train(tmp_path, prepared_corpus, f"stage.init_from={start}", "debug=fast")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert f"{start / damaged} {named}" in message and "\n" not in message


def test_debug_fast_writes_nothing_resume_would_take(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "debug=fast")
    assert "/debug/" in OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]  # not under runs/
    assert cfg.callbacks.last_checkpoint is None and cfg.callbacks.best_checkpoint is None


def test_skipped_corrupt_shards_are_totalled_in_the_metrics(tmp_path, prepared_corpus):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared_corpus, data)
    damaged = sorted((data / "prose").glob("val-*.tar"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-700] + b"x" * 700)
    cfg = compose_train(tmp_path, data, "data.on_corrupt_shard=skip", "trainer.max_steps=2",
                        "trainer.val_check_interval=2", "callbacks.text_samples=null", "export=false")
    result = train(cfg)
    # the damaged val shard is met by the first validation and by the one at step 2
    assert result["metrics"]["data/skipped_shards"] == 2


def test_model_checkpoint_takes_the_shape_of_stage_init_from(tmp_path, prepared_corpus):
    """model=checkpoint: no preset has to match the start model; a differing shape is refused, naming it."""
    from herd.train import model_config_of

    stored = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16, vocab_size=512, multiple_of=16,
                         rope_theta=10000.0, max_seq_len=256, tie_embeddings=True, attention_bias=True)
    start = hf.save(Transformer(stored), tmp_path / "start")
    cfg = compose_train(tmp_path, prepared_corpus, "model=checkpoint", f"stage.init_from={start}",
                        "model.dim=null", "model.n_layers=null", "model.n_heads=null", "model.n_kv_heads=null",
                        "model.vocab_size=null", "model.max_seq_len=128")
    config = model_config_of(cfg)
    assert config.architecture_differences(stored) == [] and config.max_seq_len == 128
    assert build(cfg)["stage"].model_config == config
    cfg.stage.init_from = None
    with pytest.raises(ValueError, match="model=checkpoint takes the model's shape from stage.init_from"):
        model_config_of(cfg)
    cfg = compose_train(tmp_path, prepared_corpus, "model=checkpoint", f"stage.init_from={start}")  # dim=64 given
    with pytest.raises(ConfigError, match="model.dim: 48 .checkpoint. vs 64 .config.; .*leave them null"):
        build(cfg)


def test_a_run_on_data_without_val_shards_trains_and_exports_unvalidated(tmp_path, prepared_corpus):
    """A folder prepared from train-split inputs only (a pipeline's sampled data) has no val shards: the run
    trains and exports with no val metrics (the data module says validation is skipped), no IndexError."""
    import shutil

    data = tmp_path / "train_only"
    shutil.copytree(prepared_corpus, data)
    manifest = json.loads((data / "manifest.json").read_text())
    for source in manifest["sources"].values():
        for shard in source["splits"]["val"]["shards"]:
            (data / shard["path"]).unlink()
        source["splits"]["val"]["shards"] = []
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = train(compose_train(tmp_path, data, "trainer.max_steps=2", "callbacks.text_samples=null"))
    assert result["trainer"].global_step == 2 and (Path(result["export_dir"]) / "config.json").is_file()
    assert result["start"] == {} and not any(key.startswith("val/") for key in result["metrics"])
