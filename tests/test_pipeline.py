"""--module-parallel: four processes (gloo), one per SIM module, make the sequential step's updates once the
pipeline's delay is accounted for (train/pipeline.py); without torchrun the flag is a clear usage error."""
import subprocess

import torch

from support.torchrun import ROOT, TIMEOUT, job_env, torchrun
from train.checkpoint import load, load_encoder
from train.config import TrainConfig
from train.model import ModelSpec
from train.pipeline import build_stages, state_dicts, train_sequential
from train.sim import batches, build_datasets, epoch_order, main, parse_args

# SIM with BatchNorm: posterior noise and batch statistics, both reproduced stage by stage
TINY = ["--method", "sim", "--channels", "16", "--hidden", "8", "--threads", "1", "--max-clips", "12",
        "--batch-size", "4", "--epochs", "2", "--lr", "3e-3"]


def sequential_reference(cfg: TrainConfig) -> tuple[dict, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # as the ranks ran: the same summation order
    try:
        return _sequential(cfg)
    finally:
        torch.set_num_threads(threads)


def _sequential(cfg: TrainConfig) -> tuple[dict, dict]:
    torch.manual_seed(cfg.seed)
    train_ds, _ = build_datasets(cfg)
    dims = ModelSpec(cfg.method, cfg.channels, cfg.hidden, cfg.batch_norm)
    stages = build_stages(dims, cfg.seed, cfg.lr, cfg.beta, cfg.negatives, torch.device("cpu"))

    def feed():
        for epoch in range(cfg.epochs):
            train_ds.set_epoch(epoch)
            for _, clips in batches(train_ds, epoch_order(cfg.seed, epoch, len(train_ds)), cfg.batch_size, 0, 0):
                yield clips

    train_sequential(stages, feed())
    assert [s.updates for s in stages] == [6] * 4
    return state_dicts(stages)


def test_four_processes_make_the_sequential_steps_updates(small_corpus, tmp_path):
    args = [*TINY, "--corpus-dir", str(small_corpus), "--out", str(tmp_path / "pipe")]
    done = subprocess.run(torchrun("--standalone", "--nproc-per-node", "4") + [*args, "--module-parallel"],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "6 steps per module" in done.stdout
    saved = load(tmp_path / "pipe" / "checkpoint.pt")
    assert saved["step"] == 6 and saved["epoch"] == 2 and saved["config"]["module_parallel"] is True
    model, loss = sequential_reference(parse_args(args))
    assert set(saved["model"]) == set(model) and set(saved["loss"]) == set(loss)
    differ = {k: float((saved[part][k] - ref[k]).abs().max()) for part, ref in (("model", model), ("loss", loss))
              for k in ref if not torch.allclose(saved[part][k], ref[k], rtol=1e-5, atol=1e-6)}
    assert not differ, differ
    encoder, _ = load_encoder(tmp_path / "pipe" / "checkpoint.pt")  # an ordinary checkpoint for export/report
    torch.manual_seed(0)
    untrained = build_stages(encoder.dims, 0, 3e-3, 0.0033, "sequence", torch.device("cpu"))
    start, _ = state_dicts(untrained)
    assert any(float((model[k] - start[k]).abs().max()) > 1e-3 for k in model if k.endswith("weight"))


def test_module_parallel_needs_torchrun_and_a_greedy_method(tmp_path, capsys):
    assert main(["--module-parallel", "--out", str(tmp_path)]) == 2
    assert "torchrun --standalone --nproc-per-node 4" in capsys.readouterr().err
