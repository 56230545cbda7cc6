"""Data-parallel SAE training: a real 2-process ``torchrun`` (gloo, CPU) run equals the 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lmlab.interp.sae import SAE, load_sae, train_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sae_text(tmp_path_factory, tiny_corpus):
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("sae-ddp-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


def _args(text, out) -> list[str]:
    return ["interp", "sae", "train", "ref:dense", "--hooks", "blocks.1.hook_resid_post", "--k", "4",
            "--expansion", "2", "--tokens", "3k", "--batch-size", "256", "--data", str(text), "--max-bytes",
            "200000", "--seq-len", "32", "--lm-batch", "4", "--buffer-tokens", "1024", "--eval-tokens", "0",
            "--warmup-steps", "2", "--dead-tokens", "512", "--device", "cpu", "--threads", "1", "--out", str(out),
            "-q"]


@pytest.mark.slow
def test_two_process_torchrun_equals_single_process(ref_zoo, sae_text, tmp_path):
    import glob
    import tempfile

    scratch = set(glob.glob(os.path.join(tempfile.gettempdir(), "lmlab-sae-rank*")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "lmlab", *_args(sae_text, one)], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(_free_port()), "-m", "lmlab", *_args(sae_text, two)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = load_sae(one / "saes" / "blocks.1.hook_resid_post")
    b = load_sae(two / "saes" / "blocks.1.hook_resid_post")
    assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    init = SAE(a.d_in, a.d_sae, a.k).init_llama_scope(0.5, torch.Generator().manual_seed(0))
    moved = (a.W_dec - init.W_dec).abs().max()
    assert moved > 1e-2  # training changed the weights, so the comparison below means something
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ta, tb = getattr(a, name), getattr(b, name)
        print(f"{name}: max |1 proc - 2 procs| = {float((ta - tb).abs().max()):.2e}")
        assert torch.allclose(ta, tb, atol=1e-4, rtol=1e-3), (name, float((ta - tb).abs().max()))
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    fa = ra["saes"]["blocks.1.hook_resid_post"]["train"]["fvu"]
    fb = rb["saes"]["blocks.1.hook_resid_post"]["train"]["fvu"]
    assert abs(fa - fb) < 1e-4
    print(f"final FVU: 1 proc {fa:.6f}, 2 procs {fb:.6f}")
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "lmlab-sae-rank*"))) <= scratch  # rank 1 cleaned up


def test_sharded_loss_sums_to_the_global_fvu():
    """The per-shard loss with the global denominator sums to the one-process FVU (no process group needed)."""
    from lmlab.interp.sae import fvu
    from lmlab.interp.sae_dist import DistContext

    g = torch.Generator().manual_seed(0)
    sae = SAE(16, 64, 4).init_llama_scope(0.5, g)
    x = torch.randn(100, 16, generator=g)
    full = train_step(sae, x, x, 4)
    parts = [train_step(sae, x, x, 4, dist=DistContext(r, 3, torch.device("cpu"))) for r in range(3)]
    total = sum(float(p["fvu"]) for p in parts)
    assert abs(total - float(full["fvu"])) < 1e-5
    with torch.no_grad():
        assert abs(float(full["fvu"]) - float(fvu(sae(x), x))) < 1e-4
    grads = []
    for out in [full, *parts]:
        sae.zero_grad()
        out["loss"].backward()
        grads.append(sae.W_dec.grad.clone())
    assert torch.allclose(grads[0], grads[1] + grads[2] + grads[3], atol=1e-6)
