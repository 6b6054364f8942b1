"""python -m herd.generate and python -m herd.chat on an exported tiny model with a herd tokenizer."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from herd.chat import ChatSession, converse
from herd.data.chat import encode_dialog
from herd.data.tokenizer import train_tokenizer
from herd.generate import encode_prompt, format_outputs, run
from herd.inference import load
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 2-layer model with a 512-id herd tokenizer, exported as Hugging Face Llama."""
    root = tmp_path_factory.mktemp("generate")
    texts = [inspect.getsource(module) for module in (textwrap, inspect)]
    train_tokenizer(texts, vocab_size=512).save(root / "tokenizer")
    torch.manual_seed(0)  # module scope: set up before the per-test seed
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=512))
    return hf.save(model, root / "model", tokenizer=root / "tokenizer")


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("generate", overrides=list(overrides))


def command(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


# ----------------------------------------------------------------------------------- herd.generate


def test_chat_prompts_are_user_messages_and_raw_prompts_follow_bos(model_dir):
    loaded = load(str(model_dir))
    tok = loaded.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode_prompt(loaded, "Hi", chat=True, system="Be brief.") == encode_dialog(
        tok, messages, add_generation_prompt=True).ids
    assert encode_prompt(loaded, "def f(x):", chat=False) == [tok.bos_id, *tok.encode("def f(x):")]
    assert set(loaded.chat.stop_ids) >= {tok.special_id("eot_id"), tok.special_id("eom_id")}


def test_every_prompt_and_sample_is_generated_in_one_run(model_dir):
    texts = run(compose_generate(f"model_dir={model_dir}", "prompt=[Hello,How are you?]", "num_samples=3",
                                 "max_new_tokens=6", "temperature=1.0"))
    assert len(texts) == 6 and len(set(texts)) > 1
    raw = run(compose_generate(f"model_dir={model_dir}", "prompt='def f(x):'", "chat=false", "max_new_tokens=6",
                               "temperature=0", "dtype=bf16"))
    assert len(raw) == 1 and raw[0].startswith("def f(x):") and len(raw[0]) > len("def f(x):")
    assert format_outputs(["a", "b"], 1, 2) == "--- prompt 1/1, sample 1/2 ---\na\n--- prompt 1/1, sample 2/2 ---\nb"


@pytest.mark.slow
@pytest.mark.parametrize("chat", ["true", "false"])
def test_command_line_prints_the_outputs(model_dir, chat):
    out = command("herd.generate", f"model_dir={model_dir}", "prompt=[Hello,Goodbye]", f"chat={chat}",
                  "max_new_tokens=5", "num_samples=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("--- prompt ") == 4 and "--- prompt 2/2, sample 2/2 ---" in out.stdout
    if chat == "false":
        assert "---\nGoodbye" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["model_dir=/nonexistent/model"], "is not a directory"),
    ([], "model_dir is required"),
    (["model_dir={model_dir}", "top_p=1.5"], "top_p must be in (0, 1]"),
    (["model_dir={model_dir}", "dtype=fp16"], "use fp32 or bf16"),
    (["model_dir={model_dir}", "quantize=int8"], "quantize='int8' is not a quantization method; use one of"),
])
def test_command_line_mistakes_exit_2_without_a_traceback(model_dir, args, message):
    out = command("herd.generate", "prompt=Hi", *(a.format(model_dir=model_dir) for a in args))
    assert out.returncode == 2
    assert out.stderr.startswith("herd.generate: ") and message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(("damaged", "named"), [("tokenizer.json", "is not a valid tokenizer.json"),
                                                ("tokenizer_config.json", "is not valid JSON")])
def test_an_invalid_tokenizer_file_is_named_in_one_line(model_dir, tmp_path, damaged, named, capsys):
    import shutil

    from herd.generate import main

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / damaged).write_text("{not json")
    with pytest.raises(SystemExit) as exit_status:
        main.__wrapped__(compose_generate(f"model_dir={copy}", "prompt=Hi", "max_new_tokens=2"))
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"herd.generate: {copy / damaged} {named}") and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def fp8_model_dir(model_dir, tmp_path_factory) -> Path:
    """A random 3-layer model (so the middle block's FFN is quantized) with the same tokenizer."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=512))
    return hf.save(model, tmp_path_factory.mktemp("fp8") / "model", tokenizer=model_dir.parent / "tokenizer")


def test_fp8_rowwise_quantization_in_generate_and_chat(fp8_model_dir):
    from herd.model import Float8RowwiseLinear

    loaded = load(str(fp8_model_dir), quantize="fp8_rowwise")
    assert isinstance(loaded.model.layers[1].feed_forward.w2, Float8RowwiseLinear)
    assert not isinstance(loaded.model.layers[0].feed_forward.w2, Float8RowwiseLinear)
    texts = run(compose_generate(f"model_dir={fp8_model_dir}", "prompt=[Hello,Hi]", "max_new_tokens=5",
                                 "temperature=0", "quantize=fp8_rowwise", "dtype=bf16"))
    assert len(texts) == 2
    session = ChatSession(loaded.model, loaded.chat, max_new_tokens=4, temperature=0)
    assert isinstance("".join(session.reply("Hello")), str) and len(session.history) == 1
    with pytest.raises(ValueError, match="quantize='fp4' is not a quantization method"):
        load(str(fp8_model_dir), quantize="fp4")


def test_command_line_generates_with_fp8_rowwise(fp8_model_dir):
    out = command("herd.generate", f"model_dir={fp8_model_dir}", "prompt='def f(x):'", "chat=false",
                  "max_new_tokens=5", "quantize=fp8_rowwise")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def f(x):")


def test_a_model_directory_without_a_tokenizer_is_refused(tmp_path):
    hf.save(Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512)), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json: pass tokenizer="):
        run(compose_generate(f"model_dir={tmp_path}", "prompt=Hi"))


# --------------------------------------------------------------------------------------- herd.chat


def test_the_second_turn_prompt_holds_the_first_exchange(model_dir):
    loaded = load(str(model_dir))
    session = ChatSession(loaded.model, loaded.chat, system="Be brief.", max_new_tokens=8, temperature=0)
    first = "".join(session.reply("What is a tuple?"))
    assert session.history == [("What is a tuple?", first.strip())]
    messages = session.messages("And a list?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "What is a tuple?" and messages[2]["content"] == first.strip()
    before = encode_dialog(loaded.tokenizer, messages[:3]).ids  # system + first exchange, closed by eot
    assert session.prompt_ids("And a list?")[: len(before)] == before


def test_converse_answers_each_line_until_exit_and_reset_forgets(model_dir):
    loaded = load(str(model_dir))
    session = ChatSession(loaded.model, loaded.chat, max_new_tokens=4, temperature=0)
    written: list[str] = []
    converse(session, ["Hi\n", "\n", "Again\n", "/reset\n", "Third\n", "/exit\n", "Never answered\n"], written.append)
    assert [question for question, _ in session.history] == ["Third"]
    assert "(history cleared)\n" in written and written.count("\n") == 3  # one line end per answer


def test_old_exchanges_are_forgotten_when_the_dialog_outgrows_the_context(model_dir):
    loaded = load(str(model_dir))
    room = loaded.model.config.max_seq_len - 160  # leaves 160 positions for the prompt
    session = ChatSession(loaded.model, loaded.chat, max_new_tokens=room, temperature=0)
    session.history = [(f"question {i}", f"answer {i}") for i in range(6)]
    ids = session.prompt_ids("last question")
    assert len(ids) + room <= loaded.model.config.max_seq_len
    assert 0 < len(session.history) < 6 and session.history[-1][0].startswith("question 5")


@pytest.mark.slow
def test_chat_command_reads_a_pipe(model_dir):
    out = command("herd.chat", f"model_dir={model_dir}", "max_new_tokens=6", "temperature=0",
                  stdin="Hello there\nWhat did I say?\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stdout.count("\n") >= 2
    bad = command("herd.chat", "model_dir=/nonexistent/model", stdin="Hi\n")
    assert bad.returncode == 2 and bad.stderr.startswith("herd.chat: ") and "Traceback" not in bad.stderr


def test_text_samples_callback_continues_every_prompt_in_one_batch(model_dir):
    from herd.callbacks.samples import TextSamples

    model = load(str(model_dir)).model.train()
    texts = TextSamples(str(model_dir), ["Hello", "def f(x):"], max_new_tokens=4).complete(model)
    assert len(texts) == 2 and texts[0].startswith("    Hello") and texts[1].startswith("    def f(x):")
    assert model.training  # put back as it was
