"""The embedded speech set stdlib:speech: espeak-ng utterances, deterministic, with a held-out split."""

from __future__ import annotations

import io
import json
import wave

import pytest

from herd.data.embedded.speech import VOCABULARY, VOICES, speech_options, stdlib_speech
from herd.data.kinds import assign_split
from herd.data.kinds.audio import SAMPLE_RATE


def seconds(wav: bytes) -> float:
    with wave.open(io.BytesIO(wav)) as clip:
        return clip.getnframes() / clip.getframerate()


def test_utterances_are_deterministic_short_and_drawn_from_the_small_vocabulary():
    first, again = list(stdlib_speech(12, seed=3)), list(stdlib_speech(12, seed=3))
    assert first == again
    assert [u.synthesize() for u in first[:4]] == [u.synthesize() for u in again[:4]]  # the same audio, byte for byte
    assert [u.text for u in stdlib_speech(12, seed=4)] != [u.text for u in first]
    many = list(stdlib_speech(300))
    assert all(3 <= len(u.text.split()) <= 5 and set(u.text.split()) <= set(VOCABULARY) for u in many)
    assert {u.voice for u in many} == set(VOICES) and len(VOCABULARY) == 20
    assert {u.speed for u in many} <= set(range(140, 201)) and {u.pitch for u in many} <= set(range(30, 71))
    lengths = [seconds(u.synthesize()) for u in many[:20]]
    assert min(lengths) > 0.5 and max(lengths) < 3.0 and 1.0 < sum(lengths) / len(lengths) < 2.0
    with pytest.raises(ValueError, match="unknown option 'voices'"):
        speech_options("stdlib:speech?voices=2")
    with pytest.raises(ValueError, match="min_words <= max_words"):
        speech_options("stdlib:speech?min_words=4&max_words=2")


def test_the_prepared_set_holds_out_utterances_by_id(prepared_speech):
    manifest = json.loads((prepared_speech / "manifest.json").read_text())
    entry = manifest["sources"]["speech"]
    assert entry["kind"] == "audio" and entry["examples"] == 64 and entry["skipped"] == {}
    train, val = entry["splits"]["train"], entry["splits"]["val"]
    expected_val = sum(assign_split(u.id, 0.25) == "val" for u in stdlib_speech(64))
    assert val["examples"] == expected_val and 0 < expected_val < 32 and train["examples"] == 64 - expected_val
    assert 1.0 < (train["seconds"] + val["seconds"]) / 64 < 2.0
    assert entry["speech_start_id"] == manifest["tokenizer"]["special_ids"]["speech_start"]
    assert SAMPLE_RATE == 16_000


def test_stdlib_transcripts_are_the_sets_sentences_as_text_dialogs():
    from herd.data.kinds.dialog import iter_dialogs

    dialogs = list(iter_dialogs("stdlib:transcripts?count=5&seed=2"))
    texts = [u.text for u in stdlib_speech(5, seed=2)]
    assert [d.messages[1]["content"] for d in dialogs] == texts
    assert [d.messages[0]["content"] for d in dialogs] == [f"Transcribe: {t}" for t in texts]
    assert [m["role"] for m in dialogs[0].messages] == ["user", "assistant"] and len({d.id for d in dialogs}) == 5
    with pytest.raises(ValueError, match="unknown option 'words'"):
        list(iter_dialogs("stdlib:transcripts?words=3"))
