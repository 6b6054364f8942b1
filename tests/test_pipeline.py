"""python -m herd.pipeline: steps in order, outputs feeding the next, a failed step named, and resuming
after a kill (within a step and between steps) without redoing finished steps. The steps here are
cheap stand-ins (python scripts); the real post-training pipelines are only composed and resolved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from herd.pipeline import PipelineError, plan_from, report
from herd.presets import config_dir

# A stand-in step: records that it ran, waits while a hold file exists (so a test can kill it
# midway), fails while a fail file exists, and writes its output: what it was given, and whether
# it found the partial work a killed attempt left in its folder (as herd.train finds its checkpoint).
STEP = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    folder, name, given = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    root = Path(os.environ["FAKE_ROOT"])
    with open(root / "runs.txt", "a") as runs:
        runs.write(name + "\\n")
    resumed = (folder / "partial").exists()
    if (root / f"fail-{name}").exists():
        print(f"{name}: something went wrong", flush=True)
        sys.exit(3)
    if (root / f"hold-{name}").exists():
        print(f"{name}: half way", flush=True)
        (folder / "partial").write_text("half done")
        (root / f"started-{name}").write_text("")
        time.sleep(120)
    number = int("".join(c for c in name if c.isdigit()) or 0)  # b2 -> 2: a figure for the report
    (folder / "out.json").write_text(json.dumps({"given": given, "resumed": resumed, "score": number / 10}))
""")

PIPELINE = textwrap.dedent("""
    # @package _global_
    name: fake
    rounds: 2
    flavour: plain
    first_policy: ${step:a}
    policy_step: b
    setup:
      - name: a
        tool: command
        argv: [python, "${oc.env:FAKE_ROOT}/step.py", "${dir:}", a, "${start}"]
        output: out.json
    round:
      - name: b
        tool: command
        argv: [python, "${oc.env:FAKE_ROOT}/step.py", "${dir:}", "b${round:}", "${policy:}|${flavour}"]
        output: out.json
    finish:
      - name: check
        tool: command
        per_round: true
        argv: [python, "${oc.env:FAKE_ROOT}/step.py", "${dir:}", "check${round:}", "${policy:}"]
        output: out.json
    report:
      b score: b/score
      check score: check/score
""")


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "fake.yaml").write_text(PIPELINE)
    (tmp_path / "begin").mkdir()
    monkeypatch.setenv("FAKE_ROOT", str(tmp_path))
    return tmp_path


def _command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "herd.pipeline", "pipeline=fake", f"hydra.searchpath=[file://{root}]",
            f"start={root / 'begin'}", f"run_dir={root / 'run'}", *overrides]


def _runs(root: Path) -> list[str]:
    path = root / "runs.txt"
    return path.read_text().split() if path.exists() else []


def _out(root: Path, step: str) -> dict:
    return json.loads((root / "run" / step / "out.json").read_text())


def _status(root: Path, step: str) -> str:
    return json.loads((root / "run" / step / "step.json").read_text())["status"]


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_pipeline_resumes_without_redoing_finished_steps(fake):
    root = fake
    # a kill within a step: the whole process group, as a scheduler's SIGKILL would
    (root / "hold-b1").write_text("")
    process = subprocess.Popen(_command(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _wait_for(root / "started-b1", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert _runs(root) == ["a", "b1"]
    assert _status(root, "setup/a") == "finished" and _status(root, "round1/b") == "running"
    (root / "hold-b1").unlink()
    # run again, stopping between steps after round 2's step
    done = subprocess.run(_command(root, "until=round2/b"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _runs(root) == ["a", "b1", "b1", "b2"]  # a is not redone; b1 continues in its folder
    assert _out(root, "round1/b") == {"given": f"{root}/run/setup/a/out.json|plain", "resumed": True, "score": 0.1}
    assert _out(root, "round2/b")["given"] == f"{root}/run/round1/b/out.json|plain"  # outputs feed the next round
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert [s["status"] for s in summary["steps"]] == ["finished"] * 3 + ["pending"] * 3
    # and again, to the end: only the finish steps are left; each sees the policy its round ended with
    done = subprocess.run(_command(root), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _runs(root) == ["a", "b1", "b1", "b2", "check0", "check1", "check2"]
    assert [_out(root, f"finish/round{r}/check")["given"] for r in range(3)] == [
        f"{root}/run/setup/a/out.json", f"{root}/run/round1/b/out.json", f"{root}/run/round2/b/out.json"]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and [s["skipped"] for s in summary["steps"]] == [True] * 3 + [False] * 3
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    final = f"{root}/run/round2/b/out.json"  # the last round's policy_step
    assert summary["final_model"] == final and f"herd.pipeline: final model: {final}" in done.stdout
    # a command step's JSON output gives its figures; the report columns read them per round
    assert [(r["b score"], r["check score"]) for r in summary["rounds"]] == [(None, 0.0), (0.1, 0.1), (0.2, 0.2)]
    assert_report(root / "run", summary)
    # a changed option reruns the steps whose command changed, from scratch, and everything after them
    done = subprocess.run(_command(root, "flavour=spicy"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _runs(root)[7:] == ["b1", "b2", "check0", "check1", "check2"]
    assert _out(root, "round1/b") == {"given": f"{root}/run/setup/a/out.json|spicy", "resumed": False,
                                      "score": 0.1}


def assert_report(run_dir: Path, summary: dict) -> None:
    """report.md next to summary.json: the final model and every step linked relative to the run folder,
    the per-round table as summary.json has it, and its figure (a PNG beside it)."""
    text = (run_dir / "report.md").read_text()
    assert text.startswith(f"# herd.pipeline: fake ({summary['status']})")
    assert "- **final model**: [round2/b/out.json](round2/b/out.json)" in text
    table = text[text.index("## Per round"):].split("\n\n")[2].splitlines()
    assert table[0] == "| round | seconds | cpu_seconds | b score | check score |"
    assert [line.split(" | ")[-2:] for line in table[2:]] == [["-", "0 |"], ["0.1", "0.1 |"], ["0.2", "0.2 |"]]
    assert "![per-round figures](report_rounds.png)" in text
    assert (run_dir / "report_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in summary["steps"]:
        name = step["name"]
        assert f"| {name} | command | finished |" in text and f"[step.log]({name}/step.log)" in text
        assert f"[{name}/out.json]({name}/out.json)" in text
    assert "## Training curves" not in text  # no training step: no curves


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}/stat").exists() else "R"
    return state != "Z"


@pytest.mark.slow
def test_a_sigkilled_pipeline_keeps_its_step_log_and_its_orphan_is_found_on_rerun(fake):
    """SIGKILL to the pipeline process alone: step.log keeps what the step printed, the step goes on alone,
    and running the pipeline again refuses to start that step twice, naming its pid."""
    root = fake
    (root / "hold-b1").write_text("")
    process = subprocess.Popen(_command(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        _wait_for(root / "started-b1", process)
        time.sleep(0.5)  # the pipeline reads the line the step printed before it wrote started-b1
    finally:
        process.kill()
        process.wait()
    log = root / "run" / "round1" / "b" / "step.log"
    orphan = json.loads((root / "run" / "round1" / "b" / "step.pid").read_text())["pid"]
    try:
        assert "b1: half way" in log.read_text()  # the line reached the file, not a buffer that died with the pipeline
        assert _alive(orphan)
        again = subprocess.run(_command(root), capture_output=True, text=True)
        assert again.returncode == 2, again.stdout + again.stderr
        assert again.stderr.strip().splitlines() == [
            f"herd.pipeline: step round1/b is still running as process {orphan}, started by an earlier herd.pipeline "
            f"that was killed (its output goes on into {log}): wait for it to end, or stop it (kill {orphan}), then "
            "run the same command again"]
        assert _runs(root) == ["a", "b1"]  # not started a second time
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    (root / "hold-b1").unlink()
    done = subprocess.run(_command(root, "until=round1/b"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _runs(root) == ["a", "b1", "b1"] and _out(root, "round1/b")["resumed"]
    assert not (root / "run" / "round1" / "b" / "step.pid").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_is_forwarded_to_the_step_which_is_recorded_interrupted(fake, signum):
    root = fake
    (root / "hold-b1").write_text("")
    process = subprocess.Popen(_command(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        _wait_for(root / "started-b1", process)
        pid = json.loads((root / "run" / "round1" / "b" / "step.pid").read_text())["pid"]
        process.send_signal(signum)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:  # a failed check: leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, output
    assert not _alive(pid)  # the step got the signal: it is not left running
    record = json.loads((root / "run" / "round1" / "b" / "step.json").read_text())
    assert (record["status"], record["signal"]) == ("interrupted", signal.Signals(signum).name)
    assert json.loads((root / "run" / "summary.json").read_text())["status"] == "interrupted"
    assert "b1: half way" in (root / "run" / "round1" / "b" / "step.log").read_text()


def test_a_failed_step_stops_the_pipeline_and_is_named(fake):
    root = fake
    (root / "fail-b1").write_text("")
    done = subprocess.run(_command(root), capture_output=True, text=True)
    assert done.returncode == 1
    assert "step round1/b failed (exit status 3)" in done.stdout + done.stderr
    assert "b1: something went wrong" in (root / "run" / "round1" / "b" / "step.log").read_text()
    assert _runs(root) == ["a", "b1"]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert (summary["status"], summary["failed_step"]) == ("failed", "round1/b")
    report = (root / "run" / "report.md").read_text()
    assert report.startswith("# herd.pipeline: fake (failed)")
    assert "- **failed step**: round1/b (its log: [round1/b/step.log](round1/b/step.log))" in report
    assert "(not written yet)" in report
    assert _status(root, "round1/b") == "failed"


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("pipeline", overrides=[f"pipeline={name}", *overrides])


def _config(steps: dict, tmp_path: Path, **top):
    return OmegaConf.create({"name": "t", "start": str(tmp_path), "run_dir": str(tmp_path / "run"), "rounds": 1,
                             "first_policy": "${start}", "policy_step": "x", "setup": [], "round": [],
                             "finish": [], "report": {}, **steps, **top})


def test_config_mistakes_are_refused_before_anything_runs(tmp_path):
    python = {"tool": "command", "argv": ["python", "-c", "pass"]}
    cases = [
        ({"setup": [{"name": "x", "tool": "nope"}]}, "tool='nope' is not one of"),
        ({"setup": [{"name": "x", "tool": "command", "argv": ["${step:y}"]}, {"name": "y", **python}]},
         "${step:y} is setup/y, which does not run before setup/x"),
        ({"round": [{"name": "x", **python, "argv": ["${step:missing}"]}]}, "names no step"),
        ({"setup": [{"name": "x", **python}, {"name": "x", **python}]}, "two steps are named 'x'"),
        ({"setup": [{"name": "x", "tool": "train", "args": ["hydra.run.dir=/x"]}]}, "which the pipeline sets itself"),
        ({"setup": [{"name": "x", "tool": "prepare", "seeds": [1, 2]}]}, "seeds only apply to tool=train"),
        ({"setup": [{"name": "x", **python}], "final_model": "y"}, "final_model=y: no such step"),
    ]
    for steps, message in cases:
        with pytest.raises(PipelineError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
            plan_from(_config(steps, tmp_path))
    with pytest.raises(PipelineError, match="start=.* does not exist"):
        plan_from(_config({}, tmp_path, start=str(tmp_path / "absent")))


def test_seeds_train_once_each_and_are_averaged(tmp_path):
    cfg = _config({"round": [{"name": "x", "tool": "train", "seeds": [1, 2], "args": ["experiment=tiny_sft",
                                                                                  "stage.init_from=${policy:}"]}]},
                  tmp_path)
    plan = plan_from(cfg)
    assert [s.name for s in plan.steps] == ["round1/x/seed1", "round1/x/seed2", "round1/x"]
    first, second, average = plan.steps
    assert first.command[-4:] == [f"hydra.run.dir={first.dir}", f"paths.log_dir={first.dir}", "resume=auto", "seed=1"]
    assert f"stage.init_from={tmp_path}" in second.command and "seed=2" in second.command
    assert average.command[1:5] == ["-m", "herd.average", f"models=['{first.output}','{second.output}']",
                                    f"output={average.dir / 'model'}"]
    assert average.output == tmp_path / "run" / "round1" / "x" / "model"
    records = {"round1/x/seed1": {"metrics": {"val/loss": 2.0}}, "round1/x/seed2": {"metrics": {"val/loss": 3.0}},
               "round1/x": {"metrics": {"val/loss": 2.5, "runs": 2.0}, "seconds": 5.0, "cpu_seconds": 9.0}}
    cfg.report = {"loss": "x/val/loss"}
    assert report(plan, records)[1] == {"round": 1, "seconds": 5.0, "cpu_seconds": 9.0, "loss": 2.5}


@pytest.mark.parametrize("name", ["tiny_posttrain", "llama3_8b_posttrain"])
def test_the_post_training_pipelines_compose_and_resolve(name, tmp_path):
    plan = plan_from(_compose(name, f"start={tmp_path}", f"run_dir={tmp_path / 'run'}"))
    names = [s.name for s in plan.steps]
    assert names[0] == "setup/sft_data" and "round1/sample" in names and names[-1].startswith("finish/")
    commands = {s.name: " ".join(s.command) for s in plan.steps}
    rounds = plan.rounds
    assert f"round{rounds}/dpo" in names or f"round{rounds}/dpo/seed1" in names
    final = plan.final_model()  # the last round's DPO model (its seeds' average, where it has seeds)
    assert final == plan.by_name[f"round{rounds}/dpo"].output and final.parent == tmp_path / "run" / f"round{rounds}" / "dpo"
    sample = commands[f"round{rounds}/sample"]
    assert f"policy={tmp_path}/run/round{rounds - 1}/dpo" in sample  # each round samples from the last DPO model
    assert f"reward_model={tmp_path}/run/round{rounds}/reward" in sample
    assert f"{tmp_path}/run/round{rounds}/sample/sft.jsonl" in commands[f"round{rounds}/sample_sft_data"]
    if name == "tiny_posttrain":  # the reward model also learns from annotated pairs of the policy's own answers
        annotate = commands[f"round{rounds}/annotate"]
        assert "judge=answer_f1" in annotate and f"policy={tmp_path}/run/round{rounds - 1}/dpo" in annotate
        # the same shuffle as the sample step, from where its prompts end: the two never share a question
        assert f"seed={rounds}" in sample and f"seed={rounds}" in annotate and "offset=" not in sample
        assert f"offset={plan.cfg.prompts_per_round}" in annotate
        assert f"{tmp_path}/run/round{rounds}/annotate/preferences.jsonl" in commands[f"round{rounds}/annotated_data"]
        assert f"{tmp_path}/run/round{rounds}/annotated_data/data" in commands[f"round{rounds}/reward"]


@pytest.mark.parametrize("name", ["tiny_posttrain", "llama3_8b_posttrain", "real_posttrain"])
def test_the_held_out_evaluations_score_every_answer_and_never_fail_for_want_of_kept_ones(name, tmp_path):
    """A policy whose greedy answers never end (measured: one start's round-1 DPO policy, 48 of 48 cut at
    max_new_tokens) is an evaluation's finding: min_kept=0, and the cut answers are counted in the table."""
    plan = plan_from(_compose(name, f"start={tmp_path}", f"run_dir={tmp_path / 'run'}"))
    evaluations = [s for s in plan.steps if s.section == "finish" and s.tool == "rejection_sample"]
    assert evaluations and all("min_kept=0" in s.command for s in evaluations)
    assert "heldout/unfinished_samples" in plan.cfg.report.values()


@pytest.mark.parametrize("name", ["tiny_posttrain", "llama3_8b_posttrain"])
def test_every_training_step_composes_a_train_config(name, tmp_path):
    plan = plan_from(_compose(name, f"start={tmp_path}", f"run_dir={tmp_path / 'run'}"))
    steps = [s for s in plan.steps if s.tool == "train" and s.round <= 1]
    assert {s.short for s in steps} == {"sft", "reward", "dpo"}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for step in steps:
            cfg = compose("train", overrides=step.command[3:])
            assert cfg.stage.init_from and cfg.trainer.max_steps > 0
            if name.startswith("llama3") and step.short != "reward":
                assert cfg.stage.optimizer.lr == 1.0e-5 and cfg.model.dim == 4096
            if name == "tiny_posttrain" and step.short == "sft":  # a round's SFT must not undo the last DPO
                assert cfg.stage.optimizer.lr == (1.0e-3 if step.section == "setup" else 3.0e-4)
            if name == "tiny_posttrain" and step.short == "reward":  # tiny_reward's 3e-4 stays near chance
                assert cfg.stage.optimizer.lr == 1.0e-3
                assert set(cfg.data.sources) == {"rankings", "annotated"}
                assert cfg.data.sources.annotated.data_dir.endswith(f"round{step.round}/annotated_data/data")
            if step.short == "dpo":
                assert (cfg.stage.beta, cfg.stage.nll_weight) == (0.1, 0.2)
                assert set(cfg.data.sources) == {"rankings", "sampled"}


def test_previous_names_the_last_rounds_step_and_falls_back_in_round_1(tmp_path):
    step = {"name": "x", "tool": "command", "argv": ["python", "-c", "pass", "${previous:x,${policy:}}"]}
    plan = plan_from(_config({"round": [step]}, tmp_path, rounds=3))
    assert [s.command[-1] for s in plan.steps] == [str(tmp_path), f"{tmp_path}/run/round1/x",
                                                   f"{tmp_path}/run/round2/x"]


def test_the_speech_pipeline_freezes_a_text_tuned_model_and_trains_its_baseline(tmp_path):
    plan = plan_from(_compose("tiny_speech", f"start={tmp_path}", f"run_dir={tmp_path / 'run'}"))
    assert [s.name for s in plan.steps] == ["setup/transcripts", "setup/speech_data", "setup/lm", "setup/speech",
                                            "setup/text_only", "setup/phrases_data", "setup/phrases",
                                            "setup/text_only_phrases"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        configs = {s.short: compose("train", overrides=s.command[3:]) for s in plan.steps if s.tool == "train"}
    assert configs["lm"].stage.init_from == str(tmp_path)
    assert plan.final_model() == tmp_path / "run" / "setup" / "phrases" / "export"  # final_model: phrases
    runs = {"speech": ("lm", "speech_data", False), "text_only": ("lm", "speech_data", True),  # one word per clip
            "phrases": ("speech", "phrases_data", False),  # then 1 to 3 words, each run continuing its own
            "text_only_phrases": ("text_only", "phrases_data", True)}
    for name, (start, data, withheld) in runs.items():
        cfg = configs[name]
        assert cfg.stage._target_.endswith("SpeechAdapterStage") and cfg.stage.withhold_audio is withheld
        assert cfg.stage.init_from == f"{tmp_path}/run/setup/{start}/export"
        assert cfg.data.data_dir == f"{tmp_path}/run/setup/{data}/data"


def test_a_prepare_steps_document_counts_are_its_documents_and_rankings(tmp_path, prepared_corpus,
                                                                         prepared_preferences):
    """Text counts documents (one per file of the fixture: 34 modules, as prose and as code); preference
    rankings count as documents too (each one document of the packed rows), not 0."""
    from herd.pipeline import Step, step_metrics

    def metrics(prepared: Path) -> dict[str, float]:
        return step_metrics(Step("setup/p", "setup", "p", 0, "prepare", tmp_path, prepared), {})

    text = metrics(prepared_corpus)
    files = {name: len(list((prepared_corpus.parent / name).iterdir())) for name in ("prose", "code")}
    assert text["prose/documents"] == files["prose"] and text["code/documents"] == files["code"] == 34
    rankings = metrics(prepared_preferences)
    manifest = json.loads((prepared_preferences / "manifest.json").read_text())["sources"]["preferences"]
    in_rows = sum(split["documents"] for split in manifest["splits"].values())  # document ids in the shards
    assert rankings["preferences/documents"] == in_rows > 0


def test_the_report_shows_training_curves_and_held_out_answers_of_the_first_and_the_last_policy(tmp_path):
    """The training steps' TensorBoard curves as a figure; from the per-round rejection_sample finish steps'
    sft.jsonl: round 0's and the last round's answer to the same prompts (joined by id, in round 0's order; a
    prompt the last round did not answer is left out)."""
    from torch.utils.tensorboard import SummaryWriter

    from herd.pipeline import TRAINING_FIGURE, write_report

    heldout = {"name": "heldout", "tool": "rejection_sample", "per_round": True,
               "args": ["policy=${policy:}", "reward_model=${start}", "num_samples=1"]}
    plan = plan_from(_config({"round": [{"name": "x", "tool": "train", "args": ["experiment=tiny_sft"]}],
                              "finish": [heldout]}, tmp_path, rounds=2))
    for number in (1, 2):
        writer = SummaryWriter(str(plan.by_name[f"round{number}/x"].dir / "tensorboard"))
        for step in range(4):
            writer.add_scalar("train/loss", 3.0 - step / number, step)
        writer.add_scalar("val/loss", 2.5, 3)
        writer.close()
    answers = {0: [("a", "What is a?", "an a", 0.5), ("b", "What is b?", "a b", 1.25), ("c", "And c?", "c", 2.0)],
               2: [("c", "And c?", "c, the letter", 2.5), ("a", "What is a?", "the first letter", 3.0)]}
    for number, lines in answers.items():
        folder = plan.by_name[f"finish/round{number}/heldout"].output
        folder.mkdir(parents=True)
        (folder / "sft.jsonl").write_text("".join(json.dumps(
            {"id": key, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
             "reward": reward}) + "\n" for key, question, answer, reward in lines))
    summary = {"pipeline": "t", "status": "finished", "rounds": [], "steps": [], "final_model": None}
    text = write_report(plan, summary).read_text()
    assert f"![training curves]({TRAINING_FIGURE})" in text
    assert (tmp_path / "run" / TRAINING_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| round1/x | train | pending | - | - | `" in text and "[tensorboard](round1/x/tensorboard)" in text
    section = text[text.index("## Held-out answers before and after (heldout)"):text.index("## Steps")]
    expected = []
    for key, question, before, reward, after, later in (("a", "What is a?", "an a", "0.5", "the first letter", "3"),
                                                         ("c", "And c?", "c", "2", "c, the letter", "2.5")):
        expected += [f"**{key}**", "", "```text", question, "```", "", f"round 0 (reward {reward}):", "", "```text",
                     before, "```", "", f"round 2 (reward {later}):", "", "```text", after, "```", ""]
    assert section.splitlines()[4:] == expected
