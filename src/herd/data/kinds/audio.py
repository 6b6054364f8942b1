"""Audio-transcript sources for ``herd.prepare`` (``kind: audio``): clips, their transcripts, their shards.

Inputs of a source with ``kind: audio`` (the embedded ``stdlib:speech`` is one) are those of
every media kind (:mod:`herd.data.kinds.media`):

- a folder: every audio file matching the source's ``glob`` (default ``**/*``) whose suffix is
  one of :data:`AUDIO_SUFFIXES`, with its transcript in the ``.txt`` file of the same name beside
  it (``hello.flac`` + ``hello.txt``). The example's id is the file's path relative to the folder.
- a jsonl file: one example per line, ``{"audio": "path", "transcript": "..."}``, optionally
  with ``"prompt"`` (replaces the source's), ``"id"`` and ``"group"`` (strings; the split is then
  assigned by hashing the group). A relative path is taken from the jsonl's folder.
- ``stdlib:speech``: utterances synthesised with espeak-ng (:mod:`herd.data.embedded.speech`).

Every clip is decoded when prepared (in the worker processes) with ``soundfile`` (libsndfile:
WAV, FLAC, OGG, ...), averaged to mono and resampled to 16 kHz with
``scipy.signal.resample_poly``. An input that is not usable is a
:class:`~herd.data.inputs.BadInputError` naming it, with a reason of :data:`BAD_INPUT_REASONS`
(``corrupt_audio`` for a file that does not decode, ``short_audio`` for a clip shorter than
:data:`MIN_SECONDS`, and those of every media kind). Such inputs are skipped and counted by
default; prepare fails when more than ``max_bad_fraction`` (0.1) of a source's inputs are bad.
A clip longer than the source's ``max_seconds`` (30) is dropped and counted as too long.

An example is one dialog in the Llama 3 chat format (:mod:`herd.data.chat`): the user turn holds
the prompt (the source's ``prompt`` option, default :data:`DEFAULT_PROMPT`, or the record's) and
then the clip, the assistant turn the transcript::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|speech_start|><|speech_end|><|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{transcript}<|eot_id|>

``<|speech_start|>`` and ``<|speech_end|>`` are the reserved Llama 3 tokens
``<|reserved_special_token_10|>`` and ``<|reserved_special_token_11|>`` (herd names
``speech_start`` and ``speech_end``; the manifest records their ids). The clip's embeddings go
between them when the examples are read (:mod:`herd.data.loaders.audio`), so the same shards serve
any encoder. ``loss_mask`` is true on the transcript's tokens and the closing ``<|eot_id|>``.

Shards (the ``audio`` layout of ``herd.data.shards.LAYOUTS``) hold one sample per example:
``<key>.tokens.npy``, ``<key>.loss_mask.npy``, ``<key>.audio.flac`` (the clip at 16 kHz, mono,
16-bit FLAC: lossless, about half the size of WAV) and ``<key>.json`` (id, prompt, transcript).
The manifest's splits add up the clips' ``seconds``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from math import gcd
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.chat import encode_dialog
from herd.data.embedded.speech import espeak_path, speech_options, stdlib_speech
from herd.data.inputs import BadInputError, OnBadInput
from herd.data.kinds import PrepareError, SourceSpec
from herd.data.kinds.media import Loaded, MediaExample, MediaFields, MediaKind, bad_input_reasons

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer

STDLIB_SPEECH = "stdlib:speech"
SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au")
FIELDS = MediaFields(media="audio", text="transcript", suffixes=AUDIO_SUFFIXES, files="audio files",
                     embedded=STDLIB_SPEECH)
BAD_INPUT_REASONS = (*bad_input_reasons(FIELDS), "short_audio")
DEFAULT_PROMPT = "Transcribe:"
MIN_SECONDS = 0.1
SPEECH_TOKENS = ("speech_start", "speech_end")  # herd names (herd.data.tokenizer.SPECIAL_TOKEN_NAMES)


def iter_examples(inputs: list[str], glob: str, on_bad_input: OnBadInput) -> Iterator[MediaExample]:
    """The examples of an audio source's inputs in order (``text`` is the transcript)."""
    return AUDIO.examples(inputs, glob, on_bad_input)


def decode_audio(data: bytes, where: str) -> np.ndarray:
    """An audio file's bytes as float32 samples in [-1, 1], mono, at 16 kHz.

    BadInputError ``corrupt_audio`` naming ``where`` when the bytes do not decode (or hold
    non-finite samples), ``short_audio`` when the clip is shorter than :data:`MIN_SECONDS`.
    """
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several kinds for damaged files
        raise BadInputError(f"{where}: not a readable audio file ({type(err).__name__}: {err})", "corrupt_audio",
                            where) from None
    if not np.isfinite(samples).all():
        raise BadInputError(f"{where}: the audio holds samples that are not finite numbers", "corrupt_audio", where)
    mono = resample(samples.mean(axis=1), int(rate), SAMPLE_RATE)
    if len(mono) < MIN_SECONDS * SAMPLE_RATE:
        raise BadInputError(f"{where}: the clip lasts {len(mono) / SAMPLE_RATE:.3f} s, less than {MIN_SECONDS} s",
                            "short_audio", where)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz (polyphase filtering, scipy)."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    common = gcd(rate, target)
    return resample_poly(samples, target // common, rate // common).astype(np.float32)


def flac_bytes(samples: np.ndarray) -> bytes:
    """16 kHz float samples in [-1, 1] as 16-bit mono FLAC bytes."""
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def speech_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of ``<|speech_start|>`` and ``<|speech_end|>``; PrepareError when the tokenizer lacks them."""
    try:
        return tokenizer.special_id("speech_start"), tokenizer.special_id("speech_end")
    except KeyError as err:
        raise PrepareError(f"{err.args[0]}: speech examples need the Llama 3 reserved special tokens 10 and 11 "
                           "and Llama 3's chat format (a Llama 3 tokenizer, or one trained by herd.prepare); herd "
                           "does not add tokens to other tokenizers for the speech adapter") from None


def encode_example(tokenizer: Tokenizer, prompt: str, transcript: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, loss_mask)`` of the dialog "user: prompt + clip; assistant: transcript" (module docstring).

    The dialog is encoded by :func:`herd.data.chat.encode_dialog`; the two speech tokens go at the
    end of the user's message, before its ``<|eot_id|>``. The mask is the assistant's role mask.
    """
    speech_ids = speech_token_ids(tokenizer)  # refuses a tokenizer without Llama 3's reserved tokens first
    dialog = encode_dialog(tokenizer, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": transcript}])
    user_end = dialog.ids.index(tokenizer.special_id("eot_id"))
    ids = [*dialog.ids[:user_end], *speech_ids, *dialog.ids[user_end:]]
    mask = [*dialog.role_mask[:user_end], False, False, *dialog.role_mask[user_end:]]
    return np.asarray(ids, np.uint32), np.asarray(mask, bool)


class AudioKind(MediaKind):
    """Audio clips with transcripts, one example per sample; see the module docstring."""

    name = "audio"
    fields = FIELDS
    options: Mapping[str, Any] = {"glob": "**/*", "prompt": DEFAULT_PROMPT, "max_seconds": 30.0}

    def check(self, spec: SourceSpec) -> None:
        """``prompt`` must be a string, ``max_seconds`` a positive number."""
        super().check(spec)
        value = spec.options["max_seconds"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= MIN_SECONDS:
            raise PrepareError(f"sources.{spec.name}.max_seconds must be a number of seconds > {MIN_SECONDS}, got "
                               f"{value!r}")

    def embedded(self, item: str) -> Iterator[MediaExample]:
        """The utterances of ``stdlib:speech?...``, synthesised when loaded (in the workers)."""
        try:
            options = speech_options(item)
        except ValueError as err:
            raise PrepareError(str(err)) from None
        espeak_path()  # a missing espeak-ng stops prepare here, saying how to install it
        for utterance in stdlib_speech(**options):
            yield MediaExample(utterance.id, utterance.text, utterance.synthesize)

    def load(self, example: MediaExample, options: Mapping[str, Any]) -> Loaded:
        """The clip decoded, at 16 kHz mono, as FLAC bytes, with its length in seconds."""
        samples = decode_audio(example.read(), example.id)
        return Loaded(flac_bytes(samples), "flac", {"seconds": len(samples) / SAMPLE_RATE})

    def too_long(self, loaded: Loaded, options: Mapping[str, Any]) -> bool:
        """True when the clip lasts more than the source's ``max_seconds``."""
        return loaded.stats["seconds"] > float(options["max_seconds"])

    def encode(self, tokenizer: Tokenizer, prompt: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """:func:`encode_example`."""
        return encode_example(tokenizer, prompt, text)

    def token_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """``speech_start_id`` and ``speech_end_id`` for the manifest."""
        start, end = speech_token_ids(tokenizer)
        return {"speech_start_id": start, "speech_end_id": end}

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """The media summary, with the hours of audio."""
        seconds = sum(float(split.get("seconds", 0.0)) for split in entry["splits"].values())
        return f"{super().summary(name, entry)}; {seconds / 3600:.2f} h of audio ({seconds / entry['examples']:.2f} s each)"


AUDIO = AudioKind()
