"""Audio-transcript sources: inputs, decoding, the dialog layout, bad clips and prepare."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile

from helpers.synthetic import prepare_config
from herd.data.inputs import BadInputError
from herd.data.kinds import PrepareError
from herd.data.kinds.audio import SAMPLE_RATE, decode_audio, encode_example, iter_examples
from herd.prepare import prepare


def tone(seconds=0.5, rate=SAMPLE_RATE, hz=440.0, channels=1) -> np.ndarray:
    """A sine tone, (samples, channels) float32."""
    wave = 0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def audio_file(path, seconds=0.5, rate=SAMPLE_RATE, channels=1) -> bytes:
    """Write a tone to ``path`` (WAV or FLAC by suffix); returns its bytes."""
    soundfile.write(path, tone(seconds, rate, channels=channels), rate)
    return path.read_bytes()


def test_clips_are_decoded_to_16_khz_mono_and_bad_ones_are_named(tmp_path):
    stereo = audio_file(tmp_path / "a.flac", seconds=1.0, rate=44_100, channels=2)
    samples = decode_audio(stereo, "a.flac")
    assert samples.dtype == np.float32 and samples.shape == (SAMPLE_RATE,)
    assert 0.25 < np.abs(samples).max() <= 0.31  # the tone's amplitude survives resampling
    with pytest.raises(BadInputError, match="a.flac: not a readable audio file") as err:
        decode_audio(stereo[: len(stereo) // 2], "a.flac")
    assert err.value.reason == "corrupt_audio" and err.value.location == "a.flac"
    with pytest.raises(BadInputError) as err:
        decode_audio(b"RIFF not really", "b.wav")
    assert err.value.reason == "corrupt_audio"
    with pytest.raises(BadInputError) as err:
        decode_audio(audio_file(tmp_path / "c.wav", seconds=0.05), "c.wav")
    assert err.value.reason == "short_audio"


def test_an_example_is_a_dialog_with_the_clip_at_the_end_of_the_user_turn(tiny_tokenizer):
    start, end = tiny_tokenizer.special_id("speech_start"), tiny_tokenizer.special_id("speech_end")
    assert (start, end) == (tiny_tokenizer.special_id("<|reserved_special_token_10|>"),
                            tiny_tokenizer.special_id("<|reserved_special_token_11|>"))
    ids, mask = encode_example(tiny_tokenizer, "Transcribe: ", "seven red left")
    assert tiny_tokenizer.decode(ids.tolist()) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTranscribe:<|reserved_special_token_10|>"
        "<|reserved_special_token_11|><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nseven red left"
        "<|eot_id|>")
    trained = ids[mask].tolist()
    assert tiny_tokenizer.decode(trained) == "seven red left<|eot_id|>"
    bare, bare_mask = encode_example(tiny_tokenizer, "", "one")
    at = bare.tolist().index(start)
    assert bare[at - 1] == tiny_tokenizer.encode("\n\n")[-1] and bare[at + 1] == end and not bare_mask[: at + 2].any()


def test_folder_and_jsonl_inputs_and_their_bad_inputs_are_named(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    audio_file(folder / "a.wav")
    (folder / "a.txt").write_text("hello there\n")
    audio_file(folder / "b.flac")  # no transcript
    audio_file(folder / "c.flac")
    (folder / "c.txt").write_text("  ")  # empty transcript
    (folder / "notes.md").write_text("not audio")
    lines = [{"audio": "clips/a.wav", "transcript": "again", "prompt": "Say:", "group": "g"},
             {"audio": "clips/a.wav"}, {"audio": 3, "transcript": "x"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    bad: list[BadInputError] = []
    examples = list(iter_examples([str(folder), str(tmp_path / "list.jsonl")], "**/*", bad.append))
    jsonl = tmp_path / "list.jsonl"
    assert [(e.id, e.text, e.prompt, e.split_key) for e in examples] == [
        ("a.wav", "hello there", None, "a.wav"), (f"{jsonl}:1", "again", "Say:", "g")]
    assert examples[1].read() == (folder / "a.wav").read_bytes()
    assert [(e.reason, e.location) for e in bad] == [
        ("no_transcript", "b.flac"), ("empty_transcript", "c.flac"), ("no_transcript", f"{jsonl}:2"),
        ("bad_field", f"{jsonl}:3")]


def test_prepare_counts_a_corrupt_clip_as_a_skip_naming_it(tiny_tokenizer, tmp_path, caplog):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("good.wav", "also.flac"):
        audio_file(folder / name, seconds=1.0, rate=22_050)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x07" * 40)
    for name in ("good", "also", "broken"):
        (folder / f"{name}.txt").write_text(f"the {name} clip")
    tokenizer = tiny_tokenizer.save(tmp_path / "tokenizer")
    out = prepare(prepare_config(tmp_path / "out", {"mine": {"input": str(folder), "kind": "audio", "prompt": "Hear:",
                                                     "max_bad_fraction": 0.5}},
                         tokenizer={"path": str(tokenizer)}, val_fraction=0.0))
    entry = json.loads((out / "manifest.json").read_text())["sources"]["mine"]
    assert entry["skipped"] == {"corrupt_audio": 1} and entry["examples"] == 2
    assert "broken.wav" in caplog.text
    assert entry["kind"] == "audio" and entry["layout"]["members"] == ["tokens", "loss_mask", "audio", "json"]
    assert entry["speech_start_id"] == tiny_tokenizer.special_id("speech_start")
    assert entry["splits"]["train"]["seconds"] == pytest.approx(2.0, abs=0.01)
    import tarfile

    with tarfile.open(out / entry["splits"]["train"]["shards"][0]["path"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    flac = members["000000000.audio.flac"]
    info = soundfile.info(io.BytesIO(flac))
    assert (info.samplerate, info.channels, info.format, info.subtype) == (SAMPLE_RATE, 1, "FLAC", "PCM_16")
    assert json.loads(members["000000000.json"]) == {"id": "also.flac", "prompt": "Hear:",
                                                     "transcript": "the also clip"}


def test_prepare_drops_clips_longer_than_max_seconds_and_fails_on_too_many_bad_ones(tiny_tokenizer, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    audio_file(folder / "long.wav", seconds=2.0)
    audio_file(folder / "short.wav", seconds=0.5)
    (folder / "long.txt").write_text("long")
    (folder / "short.txt").write_text("short")
    tokenizer = str(tiny_tokenizer.save(tmp_path / "tokenizer"))
    out = prepare(prepare_config(tmp_path / "out", {"mine": {"input": str(folder), "kind": "audio", "max_seconds": 1.5}},
                         tokenizer={"path": tokenizer}))
    entry = json.loads((out / "manifest.json").read_text())["sources"]["mine"]
    assert (entry["examples"], entry["too_long"]) == (1, 1)
    (folder / "long.wav").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match=r"1 of 2 inputs .*\(corrupt_audio: 1\)"):
        prepare(prepare_config(tmp_path / "again", {"mine": {"input": str(folder), "kind": "audio"}},
                       tokenizer={"path": tokenizer}))
    assert not (tmp_path / "again").exists()
    with pytest.raises(PrepareError, match="max_seconds"):
        prepare(prepare_config(tmp_path / "again", {"mine": {"input": str(folder), "kind": "audio", "max_seconds": "x"}},
                       tokenizer={"path": tokenizer}))


def test_a_missing_espeak_ng_says_how_to_install_it(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PrepareError, match=r"espeak-ng, which is not installed.*apt-get install espeak-ng.*"
                                           r"make prepare-speech"):
        prepare(prepare_config(tmp_path / "out", {"speech": {"input": "stdlib:speech?count=4"}},
                       tokenizer={"path": str(tiny_tokenizer.save(tmp_path / "tokenizer"))}))
    assert not (tmp_path / "out").exists()
