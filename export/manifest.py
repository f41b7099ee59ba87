"""The exported model directory's manifest.json: reading, integrity checks, p-values. Torch-free.

Layout of manifest.json ("format": "sim-export/1"), written by `python -m export.onnx`:
  method, beta, dims, config, checkpoint_sha256, opset, created, code_version
  geometry   {sample_rate, hop, receptive_field, left_reach, lookahead, level_hops, step_samples,
              state: [{name, shape (without batch), dtype}]}
  levels     ["m1", "m2", "m3", "ar"] (CPC: ["m3", "ar"]);  level_dims {level: channels}
  files      {file name: {"sha256", "role"}}   roles: module, encoder, step, flush, decoder
  calibration {"fpr", "levels": {level: {"score": "kl" | "maha", "n_ref", "reference" (sorted, <= 4096),
              "threshold", "mean", "std", "quantiles", "other": {score: same fields}, ...}}}
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

FORMAT = "sim-export/1"
MANIFEST = "manifest.json"
_NUMBER = r"-?[0-9][0-9.eE+-]*"
_NUMBER_LIST = re.compile(r"\[\s+((?:" + _NUMBER + r",\s+)*" + _NUMBER + r")\s+\]")
REQUIRED_KEYS = ("format", "method", "levels", "level_dims", "geometry", "files", "calibration")


class ManifestError(RuntimeError):
    """An exported model directory that cannot be used; the message names the file and the problem."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: str | Path, verify: bool = True) -> dict:
    """Read DIR/manifest.json; with verify, check every listed file exists and has its sha256.

    The returned dict gains "dir": the model directory (absolute)."""
    model_dir = Path(model_dir).expanduser().absolute()
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ManifestError(f"{model_dir}: no such model directory")
    if not path.is_file():
        raise ManifestError(f"{path}: missing; export a model with `python -m export.onnx CHECKPOINT --out {model_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: lacks {', '.join(missing)}")
    if verify:
        for name, entry in manifest["files"].items():
            f = model_dir / name
            if not f.is_file():
                raise ManifestError(f"{f}: listed in {path} but missing")
            digest = sha256_file(f)
            if digest != entry.get("sha256"):
                raise ManifestError(f"{f}: sha256 {digest} does not match {entry.get('sha256')} in {path} "
                                    "(file changed or corrupt; re-export)")
    manifest["dir"] = str(model_dir)
    return manifest


def write_manifest(model_dir: str | Path, manifest: dict) -> Path:
    """Write DIR/manifest.json atomically (temp file + rename)."""
    path = Path(model_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps({k: v for k, v in manifest.items() if k != "dir"}, indent=1)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)  # lists of numbers on one line
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


def step_precision(manifest: dict) -> str:
    """"fp32", or "int8" for a step quantized by `export.onnx --int8` (manifest "precision")."""
    return str((manifest.get("precision") or {}).get("step", "fp32"))


def p_value(reference_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{reference >= score}) / (N + 1) for each score (alibi-detect's practice).

    Small p: the score is larger than almost all in-distribution reference scores."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_ge = ref.size - np.searchsorted(ref, s, side="left")
    return (1.0 + n_ge) / (ref.size + 1.0)


def files_with_role(manifest: dict, role: str) -> list[str]:
    return [name for name, entry in manifest["files"].items() if entry.get("role") == role]
