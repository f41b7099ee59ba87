"""An exported model directory as the server reads it: manifest.json, the files' hashes, and what
the manifest says about the model (no onnxruntime sessions here; serve.runtime adds them).

`python -m export.onnx` writes the directory; its manifest.json ("format": "sim-export/1"):
  method, variational, beta, dims, config, checkpoint_sha256, opset, created, code_version
  geometry   {sample_rate, hop, receptive_field, left_reach, lookahead, level_hops, step_samples,
              cache_sizes, frames_per_call, state: [{name, shape (without batch), dtype}]}
  levels     ["m1", "m2", "m3", "ar"] (CPC: ["m3", "ar"]);  level_dims {level: channels}
  files      {file name: {"sha256", "role"}}   roles: module, encoder, step, flush, decoder
             (decoder_<level>.onnx), step-fp32
  calibration {"fpr", "window_seconds", "levels": {level: {"score": "kl" | "maha" (the per-frame score),
              "window_frames" (its rolling mean, serve.scoring; absent in older exports: 1), and of the
              window scores "n_ref", "reference" (sorted, <= 4096), "threshold", "mean", "std", "quantiles";
              "frame": the per-frame scores' statistics; "other": {score: same fields}, ...}}}
  precision  {"step": "int8", ...} after `--int8` (absent: everything fp32)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "sim-export/1"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "method", "variational", "levels", "level_dims", "geometry", "files", "calibration")
CONTEXT_LEVEL = "ar"  # the GRU's output: never has a posterior variance
DECODER_PREFIX = "decoder_"  # decoder graphs are named decoder_<level>.onnx


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


def step_precision(manifest: dict) -> str:
    """"fp32", or "int8" for a step quantized by `export.onnx --int8` (manifest "precision")."""
    return str((manifest.get("precision") or {}).get("step", "fp32"))


class ModelInfo:
    """What an exported model directory's manifest says: levels, widths, hops, which levels have a
    log-variance or a decoder, the streaming state, the calibration."""

    def __init__(self, model_dir: str | Path, verify: bool = True):
        self.manifest = load_manifest(model_dir, verify=verify)
        self.dir = Path(self.manifest["dir"])
        self.method: str = str(self.manifest["method"])
        self.levels: list[str] = list(self.manifest["levels"])
        self.level_dims: dict[str, int] = {k: int(v) for k, v in self.manifest["level_dims"].items()}
        geometry = self.manifest["geometry"]
        self.hop: int = int(geometry["step_samples"])  # samples per stream a streaming step consumes
        self.sample_rate: int = int(geometry["sample_rate"])
        self.level_hops: dict[str, int] = {k: int(v) for k, v in geometry["level_hops"].items()}
        self.state_spec: list[dict] = list(geometry["state"])
        self.state_names = [s["name"] for s in self.state_spec]
        self.variational: bool = bool(self.manifest["variational"])
        self.logvar_levels: tuple[str, ...] = tuple(
            lv for lv in self.levels if self.variational and lv != CONTEXT_LEVEL)
        self.decoder_files: dict[str, str] = {
            name[len(DECODER_PREFIX):-len(".onnx")]: name for name, entry in self.manifest["files"].items()
            if entry.get("role") == "decoder" and name.startswith(DECODER_PREFIX) and name.endswith(".onnx")}
        self.calibration: dict = self.manifest["calibration"]

    @property
    def step_precision(self) -> str:
        return step_precision(self.manifest)
