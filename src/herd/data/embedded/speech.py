"""The embedded speech set ``stdlib:speech``: short utterances synthesised offline with espeak-ng.

Each utterance is 3 to 5 words drawn from a vocabulary of 20 short, distinct English words (the
digits zero to nine and ten others: :data:`VOCABULARY`), spoken by one of :data:`VOICES` (espeak-ng
English voices with voice variants, male and female) at a speed of 140 to 200 words per minute
and a pitch of 30 to 70. Leading and trailing silence is trimmed (to :data:`MARGIN_SECONDS`), so
clips last about 1 to 2.5 seconds. The words are independent of each other, so a model that does
not listen can do no better than about ln 20 = 3.0 nats per word; a model that listens can get
them all right. A vocabulary this small lets a tiny model learn it on a CPU in minutes.

Like the other embedded sets (the inputs named ``stdlib:``) it needs no download, only the
espeak-ng program (``apt-get install espeak-ng``, or ``make prepare-speech``, which installs it),
and the same options give the same audio. Options go in a query string:
``stdlib:speech?count=3000&seed=0&min_words=3&max_words=5``.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.data.inputs import int_options
from herd.data.kinds import PrepareError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("red", "green", "blue", "yellow", "black", "white", "up", "down", "left", "right")
VOCABULARY = DIGITS + WORDS
# espeak-ng English voices and variants (m: male, f: female), all in the Debian package.
VOICES = ("en-us", "en-us+f2", "en-gb+m3", "en-gb+f4", "en-gb-scotland+m2", "en-029+f3", "en-gb-x-rp+m7",
          "en-us+f5")
SPEEDS = (140, 200)  # words per minute (espeak-ng -s), inclusive
PITCHES = (30, 70)  # espeak-ng -p (0 to 99), inclusive
DEFAULTS = {"count": 3000, "seed": 0, "min_words": 3, "max_words": 5}
MARGIN_SECONDS = 0.05  # silence kept before the first and after the last sound
SILENCE = 1e-3  # |amplitude| below which a sample counts as silence when trimming
ESPEAK = "espeak-ng"
INSTALL_HINT = ("install it (Debian/Ubuntu: apt-get install espeak-ng; `make prepare-speech` installs it when "
                "missing), or give the source a folder or jsonl of your own recordings")


class EspeakMissingError(PrepareError):
    """espeak-ng is not installed (or does not run); the message says how to install it."""


@dataclass(frozen=True)
class Utterance:
    """One example of the set: its id, the words spoken and how (voice, speed, pitch)."""

    id: str
    text: str
    voice: str
    speed: int
    pitch: int

    def synthesize(self) -> bytes:
        """The utterance as 16-bit mono WAV bytes (espeak-ng's rate, 22,050 Hz), silence trimmed."""
        return synthesize(self.text, self.voice, self.speed, self.pitch)


def speech_options(item: str) -> dict[str, int]:
    """The options of a ``stdlib:speech?...`` input (defaults filled in); ValueError names a bad one."""
    options = int_options(item, DEFAULTS)
    if options["count"] < 1 or not 1 <= options["min_words"] <= options["max_words"]:
        raise ValueError(f"{item}: count must be >= 1 and 1 <= min_words <= max_words")
    return options


def stdlib_speech(count: int = 3000, seed: int = 0, min_words: int = 3, max_words: int = 5) -> Iterator[Utterance]:
    """``count`` utterances (not yet synthesised); utterance i depends only on (seed, i) and the word range."""
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        words = [rng.choice(VOCABULARY) for _ in range(rng.randint(min_words, max_words))]
        yield Utterance(f"speech-{seed}-{index:06d}", " ".join(words), rng.choice(VOICES),
                        rng.randint(*SPEEDS), rng.randint(*PITCHES))


def transcript_dialogs(count: int = 3000, seed: int = 0, min_words: int = 3, max_words: int = 5,
                       prompt: str = "Transcribe:") -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The texts of ``stdlib_speech(count, seed, ...)`` as text-only dialogs ``(id, messages)``: the user
    turn is ``prompt`` and the words, the assistant repeats the words. No audio is synthesised.

    A language model that is too small to copy from its context learns it on these before it is
    frozen under the speech adapter (``pipeline=tiny_speech``).
    """
    for utterance in stdlib_speech(count, seed, min_words, max_words):
        yield (f"transcript-{seed}-{utterance.id.rsplit('-', 1)[-1]}",
               [{"role": "user", "content": f"{prompt} {utterance.text}"},
                {"role": "assistant", "content": utterance.text}])


def espeak_path() -> str:
    """The espeak-ng program's path; EspeakMissingError saying how to install it when there is none."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise EspeakMissingError(f"stdlib:speech is synthesised with espeak-ng, which is not installed (not on "
                                 f"PATH): {INSTALL_HINT}")
    return path


def synthesize(text: str, voice: str, speed: int, pitch: int) -> bytes:
    """``text`` spoken by espeak-ng as 16-bit mono WAV bytes, leading and trailing silence trimmed."""
    program = espeak_path()
    with tempfile.TemporaryDirectory(prefix="herd-espeak-") as folder:
        out = Path(folder) / "clip.wav"
        command = [program, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), "--", text]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not out.is_file():
            raise EspeakMissingError(f"espeak-ng failed ({' '.join(command)}): {result.stderr.strip()}; "
                                     f"{INSTALL_HINT}")
        with wave.open(str(out), "rb") as clip:
            rate = clip.getframerate()
            samples = np.frombuffer(clip.readframes(clip.getnframes()), "<i2")
    return _wav(_trim(samples, rate), rate)


def _trim(samples: np.ndarray, rate: int) -> np.ndarray:
    """``samples`` without the silence before and after the sound, but for a margin."""
    loud = np.flatnonzero(np.abs(samples.astype(np.float32) / 32768.0) > SILENCE)
    if loud.size == 0:
        return samples
    margin = int(MARGIN_SECONDS * rate)
    return samples[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def _wav(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()
