"""Minimal ctypes binding to the espeak-ng speech synthesiser, with phoneme timing.

espeak-ng (https://github.com/espeak-ng/espeak-ng) is licensed under the GNU GPL v3 or later.
It is not part of this project's source: the PyPI package `espeakng-loader` ships the
shared library and its data, and this module only calls that library at run time to render
the training corpus (see train/corpus.py). The audio it renders is data, not code.

Only what the corpus needs is bound: synchronous synthesis into memory, voice selection,
rate and pitch, and phoneme events (each phoneme's start, in samples of the synthesiser's
native rate, 22050 Hz for espeak-ng 1.52).

The library keeps synthesis state between utterances (pitch phase, flutter position), so the
exact samples of an utterance depend on everything rendered before it in the same process.
Render a fixed sequence in a fresh process when you need byte-identical output
(train/corpus.py does: one fresh process per voice).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_PARAM_RATE = 1  # words per minute, 80..450, default 175
_PARAM_PITCH = 3  # 0..100 within the voice's pitch range, default 50
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded or refused a request."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),  # samples since the start of the utterance, native rate
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Phoneme:
    """One phoneme event: espeak's mnemonic (stress marks stripped) and its start sample."""

    name: str
    start: int
    stressed: bool


@dataclass(frozen=True)
class Rendering:
    audio: np.ndarray  # int16, native rate
    sample_rate: int
    phonemes: tuple[Phoneme, ...]


class Espeak:
    """One synchronous espeak-ng instance. The library is process-global: create one per process."""

    _instance: Espeak | None = None

    def __init__(self) -> None:
        if Espeak._instance is not None:
            raise EspeakError("espeak-ng is process-global; reuse Espeak.get()")
        try:
            import espeakng_loader
        except ImportError:
            raise EspeakError("espeak-ng is missing: pip install espeakng-loader") from None
        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise EspeakError(f"cannot load espeak-ng from espeakng-loader: {exc}") from None
        lib = self._lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]

        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}); data path {data_path}")
        self.sample_rate = int(rate)
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._events: list[Phoneme] = []
        self._callback = _Callback(self._on_synth)  # keep a reference: the library calls it
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_ng_SetRandSeed(0)
        self.voice: str | None = None
        Espeak._instance = self

    @classmethod
    def get(cls) -> Espeak:
        return cls._instance if cls._instance is not None else cls()

    def _on_synth(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                raw = ev.id.string.decode("ascii", errors="replace")
                self._events.append(Phoneme(raw.lstrip("',"), int(ev.sample), raw.startswith("'")))
            i += 1
        return 0  # continue synthesis

    def set_voice(self, name: str) -> None:
        if self._lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise EspeakError(f"espeak-ng has no voice {name!r} (try e.g. 'sw', 'sw+m3', 'id')")
        self.voice = name

    def synth(self, text: str, *, rate: int = 175, pitch: int = 50) -> Rendering:
        """Render text with the current voice at `rate` words/minute and `pitch` (0..100)."""
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            raise ValueError(f"rate {rate} outside {RATE_RANGE} words per minute")
        if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise ValueError(f"pitch {pitch} outside {PITCH_RANGE}")
        lib = self._lib
        lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise EspeakError(f"espeak_Synth failed for {text!r} (status {status})")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return Rendering(audio.astype(np.int16, copy=False), self.sample_rate, tuple(self._events))
