"""The embedded default corpus: synthesised three-syllable words, as in the SIM paper.

The paper's corpus (one speaker, words of three syllables from {ba bi bu da di du ga gi gu},
e.g. "gi-ga-bu", 16 kHz) is not public. This module renders the same structure with several
synthetic speakers: all 729 words, each voice reading each word once with its own pitch and
speed, resampled from espeak's 22050 Hz to 16 kHz mono.

Licence: the audio is rendered by espeak-ng, which is GPL-3.0-or-later. espeak-ng is not
part of this project: the PyPI package `espeakng-loader` installs the library and its data,
and train/espeak.py calls it through ctypes at run time only.

Voices. Swahili (`sw`) and Indonesian (`id`) read the words as written (b-i-g-'a-b-u); every
rendering is checked against the expected six phonemes and the build fails otherwise.
Speakers are voice variants (m = male, f = female, klatt = a different synthesiser).
`TEST_VOICE` never renders a training word and never appears in the training split.

Syllable boundaries come from espeak's phoneme events, not from the audio: syllable k spans
[start of consonant k, start of consonant k+1) and the last one ends where espeak starts
the final pause. Bounds are stored in samples at 16 kHz. Syllables are uneven, as espeak
stresses the second and lengthens the last: mean 83 / 217 / 164 ms in the default corpus.

Speed. espeak's default rate (175 words/minute) already fits every word of these voices in
the paper's 10240-sample crop; the rate is jittered in SPEED_RANGE (175..215) and pitch in
PITCH_RANGE. Some files run past 10240 samples only by trailing silence or echo; the
speech itself (the last bound) ends before sample 10240 for every utterance of the default
corpus (the CLI summary reports both counts).

Determinism. espeak-ng carries synthesis state (pitch phase, flutter, echo) from one
utterance to the next, so each voice is rendered in a fresh process in a fixed order, and the
voice is reloaded before every word (which clears the echo of the previous word); pitch and
speed of an utterance are drawn from (seed, voice, word). The same arguments give
byte-identical wavs and manifest.

Size: 5978 files (4664 train, 1168 test, 146 test_voice); rendering is quick, one process per
voice (docs/benchmarks.md has the size on disk and the build time).

Splits. A seeded shuffle of the 729 words puts 80 % in "train" and 20 % in "test"; no word
is in both. Every training voice renders the train words ("train") and the test words
("test"); TEST_VOICE renders only the test words ("test_voice").

Layout: DIR/wavs/<id>.wav (PCM16, 16 kHz, mono), DIR/manifest.jsonl (one JSON object per
file), DIR/corpus.json (seed, voices, counts, versions). Build once with
`python -m train.corpus --out DIR` or let `ensure_corpus()` build it on first use.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.audio import CROP_SAMPLES, SAMPLE_RATE

CORPUS_VERSION = 1
CORPUS_FORMAT = "sim-corpus"
VOWELS: tuple[str, ...] = ("a", "i", "u")
CONSONANTS: tuple[str, ...] = ("b", "d", "g")
SYLLABLES: tuple[str, ...] = tuple(c + v for c in CONSONANTS for v in VOWELS)  # ba bi bu da di du ga gi gu
ALL_WORDS: tuple[str, ...] = tuple("".join(p) for p in itertools.product(SYLLABLES, repeat=3))  # 729
SPLITS: tuple[str, ...] = ("train", "test", "test_voice")
TRAIN_VOICES: tuple[str, ...] = ("sw", "sw+m1", "sw+m3", "sw+f2", "sw+klatt", "id", "id+m3", "id+f3")
TEST_VOICE = "sw+f1"
TEST_FRACTION = 0.2
SPEED_RANGE = (175, 215)  # espeak words per minute, inclusive
PITCH_RANGE = (35, 65)  # espeak pitch parameter (0..100 within the voice's range), inclusive

assert len(SYLLABLES) == 9 and len(ALL_WORDS) == 729


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete or corrupt; the message says which and how to fix it."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path  # absolute
    word: str
    syllables: tuple[str, str, str]
    vowels: tuple[str, str, str]
    voice: str
    pitch: int
    speed: int
    bounds: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # samples at 16 kHz, [start, end)
    n_samples: int
    split: str


def split_word(word: str) -> tuple[str, str, str]:
    """'gigabu' -> ('gi', 'ga', 'bu'); ValueError unless it is three syllables of SYLLABLES."""
    parts = (word[0:2], word[2:4], word[4:6])
    if len(word) != 6 or any(p not in SYLLABLES for p in parts):
        raise ValueError(f"{word!r} is not three syllables from {' '.join(SYLLABLES)}")
    return parts  # type: ignore[return-value]


def word_split(seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train_words, test_words): a seeded shuffle of ALL_WORDS, 80/20, each in ALL_WORDS order."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ALL_WORDS))
    n_test = int(round(TEST_FRACTION * len(ALL_WORDS)))
    test = set(order[:n_test].tolist())
    train_words = tuple(w for i, w in enumerate(ALL_WORDS) if i not in test)
    test_words = tuple(w for i, w in enumerate(ALL_WORDS) if i in test)
    return train_words, test_words


def _voice_slug(voice: str) -> str:
    return voice.replace("+", "_")


def _jitter(seed: int, voice: str, word: str) -> tuple[int, int]:
    """(pitch, speed) of one utterance, from (seed, voice, word) only."""
    rng = np.random.default_rng([seed, zlib.crc32(voice.encode()), ALL_WORDS.index(word)])
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
    return pitch, speed


def _plan(seed: int, words: tuple[str, ...], voices: tuple[str, ...], test_voice: str | None) -> dict[str, list]:
    """voice -> [(id, word, split, pitch, speed)] in the order they are rendered."""
    _, test_words = word_split(seed)
    test_set = set(test_words)
    plan: dict[str, list] = {}
    for voice in voices:
        plan[voice] = [
            (f"{_voice_slug(voice)}-{w}", w, "test" if w in test_set else "train", *_jitter(seed, voice, w))
            for w in words
        ]
    if test_voice is not None:
        plan[test_voice] = [
            (f"{_voice_slug(test_voice)}-{w}", w, "test_voice", *_jitter(seed, test_voice, w))
            for w in words
            if w in test_set
        ]
    return plan


def _syllable_bounds(word: str, phonemes, native_rate: int) -> list[list[int]]:
    """Three [start, end) sample ranges at 16 kHz from espeak's phoneme events; error if not C V C V C V."""
    names = [p.name for p in phonemes]
    expected = list(word)
    if names[:6] != expected or len(names) < 7 or not names[6].startswith("_"):
        raise RuntimeError(f"espeak read {word!r} as {names}; expected {expected} then a pause")
    starts = [phonemes[i].start for i in (0, 2, 4, 6)]
    to16k = [int(round(s * SAMPLE_RATE / native_rate)) for s in starts]
    return [[to16k[k], to16k[k + 1]] for k in range(3)]


def _render_voice(job: tuple[str, list, str]) -> tuple[str, list[dict]]:
    """Worker (fresh process): render one voice's utterances into wav_dir; (espeak version, records)."""
    import soundfile as sf
    import soxr

    from train.espeak import Espeak

    voice, items, wav_dir = job
    engine = Espeak.get()
    records = []
    for uid, word, split, pitch, speed in items:
        engine.set_voice(voice)  # reloading the voice clears its echo buffer: no tail of the previous word
        r = engine.synth(word, rate=speed, pitch=pitch)
        bounds = _syllable_bounds(word, r.phonemes, r.sample_rate)
        audio = soxr.resample(r.audio.astype(np.float32) / 32768.0, r.sample_rate, SAMPLE_RATE, quality="HQ")
        pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
        if bounds[2][1] > len(pcm):
            raise RuntimeError(f"{voice} {word}: syllable bounds {bounds} beyond the audio ({len(pcm)} samples)")
        sf.write(os.path.join(wav_dir, f"{uid}.wav"), pcm, SAMPLE_RATE, subtype="PCM_16")
        syllables = split_word(word)
        records.append({
            "id": uid,
            "path": f"wavs/{uid}.wav",
            "word": word,
            "syllables": list(syllables),
            "vowels": [s[1] for s in syllables],
            "voice": voice,
            "pitch": pitch,
            "speed": speed,
            "bounds": bounds,
            "n_samples": int(len(pcm)),
            "split": split,
        })
    return engine.version, records


def build_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    words: list[str] | tuple[str, ...] | None = None,
    voices: list[str] | tuple[str, ...] | None = None,
    test_voice: str | None = TEST_VOICE,
    progress: bool = True,
) -> Path:
    """Render the corpus into out_dir (built in a temporary sibling, then renamed); return out_dir.

    words/voices select a subset (tests); voices are the training voices, test_voice the held-out
    one (None: no "test_voice" split). Fails if out_dir exists and is not empty.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    words = tuple(ALL_WORDS if words is None else words)
    voices = tuple(TRAIN_VOICES if voices is None else voices)
    for w in words:
        split_word(w)
    if len(set(words)) != len(words):
        raise ValueError("words contains duplicates")
    if not voices:
        raise ValueError("at least one training voice is needed")
    if len(set(voices)) != len(voices):
        raise ValueError("voices contains duplicates")
    if test_voice is not None and test_voice in voices:
        raise ValueError(f"the held-out voice {test_voice!r} must not be a training voice")
    words = tuple(w for w in ALL_WORDS if w in set(words))  # canonical order
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")

    plan = _plan(seed, words, voices, test_voice)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "wavs").mkdir(parents=True)
    try:
        records_by_voice, espeak_version = _render_all(plan, str(tmp / "wavs"), progress)
        records = [r for voice in plan for r in records_by_voice[voice]]
        records.sort(key=lambda r: (SPLITS.index(r["split"]), list(plan).index(r["voice"]), ALL_WORDS.index(r["word"])))
        with open(tmp / "manifest.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        train_words, test_words = word_split(seed)
        info = {
            "format": CORPUS_FORMAT,
            "version": CORPUS_VERSION,
            "seed": seed,
            "sample_rate": SAMPLE_RATE,
            "voices": list(voices),
            "test_voice": test_voice,
            "speed_range": list(SPEED_RANGE),
            "pitch_range": list(PITCH_RANGE),
            "counts": {s: sum(r["split"] == s for r in records) for s in SPLITS},
            "words": {"train": [w for w in words if w in train_words], "test": [w for w in words if w in test_words]},
            "espeak_version": espeak_version,
            "licence": "audio rendered with espeak-ng (GPL-3.0-or-later), called at run time via espeakng-loader",
        }
        # corpus.json is written last: its presence marks a complete corpus.
        with open(tmp / "corpus.json", "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write("\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if (out_dir / "corpus.json").exists():  # someone else finished first: keep theirs
                shutil.rmtree(tmp)
                return out_dir
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _render_all(plan: dict[str, list], wav_dir: str, progress: bool) -> tuple[dict[str, list[dict]], str]:
    """Render every voice in its own fresh process (espeak state must not leak between voices).

    Plain subprocesses, not multiprocessing: spawn would re-run the caller's __main__ (a script
    without a main guard, or stdin), which hangs or recurses.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    jobs = [(voice, items, wav_dir) for voice, items in plan.items() if items]
    n_procs = max(1, min(len(jobs), os.cpu_count() or 1, 4))
    out: dict[str, list[dict]] = {voice: [] for voice in plan}
    versions = set()
    total = sum(len(items) for _, items, _ in jobs)
    with tqdm(total=total, desc="rendering corpus", unit="utt", disable=not progress) as bar:
        with ThreadPoolExecutor(n_procs) as pool:
            for voice, (version, records) in zip((j[0] for j in jobs), pool.map(_run_worker, jobs)):
                versions.add(version)
                out[voice] = records
                bar.update(len(records))
    return out, ",".join(sorted(versions))


def _run_worker(job: tuple[str, list, str]) -> tuple[str, list[dict]]:
    """Run _render_voice(job) in a fresh Python process; re-raise its error here."""
    import subprocess

    from train.espeak import EspeakError

    root = str(Path(__file__).resolve().parents[1])  # so the child imports this very package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-c", "import train.corpus as c; c._worker_main()"]
    res = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
    try:
        reply = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"corpus worker for voice {job[0]!r} failed (exit {res.returncode}):\n"
                           f"{res.stderr[-2000:]}") from None
    if "error" in reply:
        raise (EspeakError if reply["error"] == "EspeakError" else RuntimeError)(reply["message"])
    return reply["version"], reply["records"]


def _worker_main() -> None:
    """Child side of _run_worker: a job as JSON on stdin, one JSON line on stdout."""
    from train.espeak import EspeakError

    voice, items, wav_dir = json.load(sys.stdin)
    try:
        version, records = _render_voice((voice, [tuple(it) for it in items], wav_dir))
        reply = {"version": version, "records": records}
    except (EspeakError, RuntimeError, ValueError) as exc:
        reply = {"error": type(exc).__name__, "message": str(exc)}
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    sys.exit(1 if "error" in reply else 0)


def _read_info(corpus_dir: Path) -> dict:
    hint = f"build it with: python -m train.corpus --out {corpus_dir}"
    if not corpus_dir.is_dir():
        raise CorpusError(f"no corpus at {corpus_dir} ({hint})")
    info_path = corpus_dir / "corpus.json"
    if not info_path.is_file():
        raise CorpusError(f"{corpus_dir} is not a complete corpus: corpus.json is missing "
                          f"(delete it and rebuild; {hint})")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{info_path}: unreadable ({exc}); delete {corpus_dir} and rebuild") from None
    if not isinstance(info, dict) or info.get("format") != CORPUS_FORMAT:
        raise CorpusError(f"{info_path}: not a {CORPUS_FORMAT} description")
    if info.get("version") != CORPUS_VERSION:
        raise CorpusError(
            f"{corpus_dir}: corpus version {info.get('version')}, this code reads version {CORPUS_VERSION}; rebuild it"
        )
    return info


def corpus_info(corpus_dir: str | Path) -> dict:
    """The contents of DIR/corpus.json (CorpusError if missing or not a corpus)."""
    return _read_info(Path(corpus_dir).expanduser().absolute())


def _utterance(rec: dict, corpus_dir: Path) -> Utterance:
    bounds = tuple((int(s), int(e)) for s, e in rec["bounds"])
    syllables = tuple(rec["syllables"])
    vowels = tuple(rec["vowels"])
    if len(bounds) != 3 or len(syllables) != 3 or len(vowels) != 3:
        raise ValueError("bounds, syllables and vowels need three entries each")
    if rec["split"] not in SPLITS:
        raise ValueError(f"unknown split {rec['split']!r}")
    return Utterance(
        id=str(rec["id"]),
        path=corpus_dir / rec["path"],
        word=str(rec["word"]),
        syllables=syllables,  # type: ignore[arg-type]
        vowels=vowels,  # type: ignore[arg-type]
        voice=str(rec["voice"]),
        pitch=int(rec["pitch"]),
        speed=int(rec["speed"]),
        bounds=bounds,  # type: ignore[arg-type]
        n_samples=int(rec["n_samples"]),
        split=str(rec["split"]),
    )


def load_corpus(dir: str | Path, split: str | None = None) -> list[Utterance]:
    """Utterances of a built corpus, in manifest order; only `split` if given.

    CorpusError if the directory is missing, incomplete, or its manifest or files are corrupt.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    corpus_dir = Path(dir).expanduser().absolute()
    info = _read_info(corpus_dir)
    manifest = corpus_dir / "manifest.jsonl"
    try:
        lines = manifest.read_text().splitlines()
    except OSError as exc:
        raise CorpusError(f"{manifest}: unreadable ({exc}); delete {corpus_dir} and rebuild") from None
    utts, problems = [], []
    for n, line in enumerate(lines, 1):
        try:
            u = _utterance(json.loads(line), corpus_dir)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{manifest}:{n}: bad record ({exc!r})")
            continue
        if not u.path.is_file():
            problems.append(f"{u.path}: listed in the manifest but missing")
        utts.append(u)
    counts = {s: sum(u.split == s for u in utts) for s in SPLITS}
    if not problems and counts != info.get("counts"):
        problems.append(f"{manifest}: split counts {counts} differ from corpus.json {info.get('counts')}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CorpusError(f"corrupt corpus at {corpus_dir}; delete it and rebuild:\n  {shown}")
    return [u for u in utts if split is None or u.split == split]


def default_corpus_dir(seed: int = 0) -> Path:
    """$SIM_CACHE_DIR/corpus-v1-seed{seed}, or ~/.cache/sim-service/corpus-v1-seed{seed}."""
    base = os.environ.get("SIM_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "sim-service"
    return root / f"corpus-v{CORPUS_VERSION}-seed{seed}"


def ensure_corpus(dir: str | Path | None = None, seed: int = 0, progress: bool = True) -> Path:
    """The default corpus at dir (default_corpus_dir(seed) if None): built on first use, reused after."""
    corpus_dir = Path(dir).expanduser().absolute() if dir is not None else default_corpus_dir(seed)
    if corpus_dir.exists() and (not corpus_dir.is_dir() or any(corpus_dir.iterdir())):
        info = _read_info(corpus_dir)
        if info.get("seed") != seed:
            raise CorpusError(f"{corpus_dir} was built with seed {info.get('seed')}, not {seed}")
        return corpus_dir
    if progress:
        print(f"building the default corpus in {corpus_dir} (once)", file=sys.stderr)
    return build_corpus(corpus_dir, seed=seed, progress=progress)


def find_corpus(explicit: str | Path | None = None, trained_on: str | Path | None = None,
                progress: bool = True) -> Path:
    """The corpus a command reads: `explicit` (a --corpus flag; it must exist), else `trained_on` (the
    corpus_dir a checkpoint recorded) while it still exists, else the default corpus (built on first use)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise CorpusError(f"{path}: no such corpus directory (build one with python -m train.corpus --out DIR)")
        return path
    if trained_on and Path(trained_on).is_dir():
        return Path(trained_on)
    return ensure_corpus(None, seed=0, progress=progress)


def load_split(corpus_dir: str | Path, split: str) -> list[Utterance]:
    """Utterances of one split, in a fixed order (by id)."""
    return sorted(load_corpus(corpus_dir, split=split), key=lambda u: u.id)


def summary(corpus_dir: str | Path) -> str:
    """Human-readable counts per split and voice, durations and crop overruns."""
    utts = load_corpus(corpus_dir)
    info = corpus_info(corpus_dir)
    lines = [f"corpus {Path(corpus_dir)}  (seed {info['seed']}, espeak-ng {info['espeak_version']}, {len(utts)} files)"]
    voices = list(dict.fromkeys(u.voice for u in utts))
    width = max(len(v) for v in voices) if voices else 5
    lines.append(f"  {'voice':<{width}}  " + "  ".join(f"{s:>10}" for s in SPLITS))
    for v in voices:
        counts = (sum(u.voice == v and u.split == s for u in utts) for s in SPLITS)
        lines.append(f"  {v:<{width}}  " + "  ".join(f"{n:>10}" for n in counts))
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{sum(u.split == s for u in utts):>10}" for s in SPLITS))
    if utts:
        n = np.array([u.n_samples for u in utts])
        speech = np.array([u.bounds[2][1] for u in utts])
        ms = 1000.0 / SAMPLE_RATE
        lines.append(
            f"  file length ms: min {n.min() * ms:.0f}  mean {n.mean() * ms:.0f}  max {n.max() * ms:.0f}"
            f"   speech (to last bound) ms: min {speech.min() * ms:.0f}  mean {speech.mean() * ms:.0f}"
            f"  max {speech.max() * ms:.0f}"
        )
        lines.append(
            f"  longer than the {CROP_SAMPLES}-sample crop: {int((n > CROP_SAMPLES).sum())} files"
            f" ({int((speech > CROP_SAMPLES).sum())} with speech past the crop)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.corpus",
        description="Render the synthetic three-syllable word corpus (espeak-ng, GPL-3) and print a summary.",
    )
    parser.add_argument("--out", required=True, type=Path, help="corpus directory to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the word split and the pitch/speed jitter")
    parser.add_argument(
        "--voices", nargs="+", default=list(TRAIN_VOICES), metavar="VOICE",
        help=f"training voices (espeak names; default: {' '.join(TRAIN_VOICES)})",
    )
    parser.add_argument("--test-voice", default=TEST_VOICE, help=f"held-out voice (default: {TEST_VOICE})")
    parser.add_argument("--words", nargs="+", metavar="WORD", help="render only these words (default: all 729)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from train.cli import fail

    try:
        build_corpus(args.out, seed=args.seed, words=args.words, voices=args.voices, test_voice=args.test_voice,
                     progress=not args.no_progress)
    except (FileExistsError, ValueError, RuntimeError) as exc:  # RuntimeError: espeak refused a voice or word
        return fail(str(exc))
    print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
