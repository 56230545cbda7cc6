"""Real expert parallelism for :mod:`lmlab.train.moe` over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Layout (DeepSpeed-MoE / GShard): W ranks, each holding E/W experts (``w_in``/``w_out`` sliced to the rank's
experts) and a replica of everything else (router, attention, embeddings: data parallel, gradients summed).
Per MoE layer a rank routes its own S tokens into a buffer (E, C, d), ordered by the owner rank of each expert::

    send (W_dst, E/W, C, d) --all_to_all_single--> recv (W_src, E/W, C, d) -> experts on (E/W, W*C, d)
    out  (W_src, E/W, C, d) --all_to_all_single--> back (W_dst, E/W, C, d) = (E, C, d) in the sent order

The backward of an all-to-all is the same all-to-all of the gradient (:class:`AllToAll`, as DeepSpeed's
``_AllToAll``). gloo in torch 2.13 implements ``all_to_all_single`` for CPU tensors (equal and uneven splits),
so no emulation is needed. Intra-GPU Rectification needs no collective: an unrouted token is processed by the
best expert among the rank's own E/W. Dropless mode all-reduces the largest expert load (MAX) to size C.

Launch: ``lmlab train moe --nproc 4`` spawns 4 local processes (``torch.multiprocessing``, TCP rendezvous on
127.0.0.1); under ``torchrun --nproc_per_node 4 -m lmlab train moe ...`` each rank joins the env:// group.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EP = tuple  # (group, rank, world, device)


class AllToAll(torch.autograd.Function):
    """Equal-split ``all_to_all_single`` along dim 0 with an all-to-all backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def expert_exchange(buf: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, ep: EP) -> torch.Tensor:
    """buf (E, C, d) of this rank's tokens -> expert outputs (E, C, d) computed by the experts' owners."""
    from lmlab.train.moe import swiglu_experts

    group, _, world, _ = ep
    E, C, d = buf.shape
    el = E // world
    recv = AllToAll.apply(buf.view(world, el * C, d), group).view(world, el, C, d)  # (W_src, El, C, d)
    x = recv.transpose(0, 1).reshape(el, world * C, d)  # (El, W*C, d)
    y = swiglu_experts(x, w_in.to(x.dtype), w_out.to(x.dtype))
    y = y.view(el, world, C, d).transpose(0, 1).reshape(world, el * C, d)  # (W_src, El*C, d)
    return AllToAll.apply(y, group).view(E, C, d)


def all_reduce_max(value: int, ep: EP) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=ep[3])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ep[0])
    return int(t.item())


def all_reduce_sum(values: list[float], ep: EP) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ep[3])
    dist.all_reduce(t, group=ep[0])
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, ep: EP) -> torch.Tensor:
    t = t.detach().clone().to(ep[3])
    dist.all_reduce(t, group=ep[0])
    return t


def shard_model(model: torch.nn.Module, ep: EP) -> torch.nn.Module:
    """Keep only this rank's E/W experts in every MoE layer and switch the layers to real all-to-all."""
    from lmlab.train.moe import moe_layers

    _, rank, world, _ = ep
    for layer in moe_layers(model):
        E = layer.s.experts
        if E % world:
            from lmlab.errors import LmlabError

            raise LmlabError(f"experts ({E}) must be divisible by the number of ranks ({world})")
        el = E // world
        layer.w_in = torch.nn.Parameter(layer.w_in.data[rank * el:(rank + 1) * el].clone())
        layer.w_out = torch.nn.Parameter(layer.w_out.data[rank * el:(rank + 1) * el].clone())
        layer.ep = ep
    return model


def is_expert_param(name: str) -> bool:
    return name.endswith(("w_in", "w_out"))


def reduce_grads(model: torch.nn.Module, ep: EP) -> None:
    """Sum the replicated parameters' gradients over ranks (one flat all-reduce; expert shards stay local)."""
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and not is_expert_param(n)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ep[0])
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def gather_experts(model: torch.nn.Module, ep: EP) -> None:
    """Reassemble the full expert weights on every rank (for saving) and switch back to simulation."""
    from lmlab.train.moe import moe_layers

    group, _, world, _ = ep
    for layer in moe_layers(model):
        for name in ("w_in", "w_out"):
            p = getattr(layer, name).data.contiguous()
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p, group=group)
            setattr(layer, name, torch.nn.Parameter(torch.cat(parts)))
        layer.ep = None


# ----------------------------------------------------------------------------------------------------
# launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend: str = "auto") -> EP:
    """Join the env:// process group; returns ``(group, rank, world, device)``."""
    backend = _backend(backend)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return (dist.group.WORLD, rank, world, dev)


def _spawned(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` local processes that can :func:`init` (TCP rendezvous on 127.0.0.1)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(world, free_port(), fn, args), nprocs=world, join=True)


def spawn(cfg: Any) -> None:
    """``lmlab train moe --nproc W``: torchrun starts W local ranks running :func:`run_rank` on the resolved config.

    A torchrun subprocess rather than ``torch.multiprocessing.spawn``: spawn re-imports the parent's ``__main__``,
    which for ``python -m lmlab`` would re-run the CLI in every child.
    """
    import subprocess
    import sys
    import tempfile

    from lmlab.config import dump_yaml
    from lmlab.errors import LmlabError

    with tempfile.TemporaryDirectory(prefix="lmlab-moe-") as tmp:
        conf = Path(tmp) / "config.yaml"
        conf.write_text(dump_yaml(cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cfg.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lmlab.train.moe_parallel",
               str(conf)]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads or 1)}
        log.info("launching %d expert-parallel ranks: %s", cfg.nproc, " ".join(cmd))
        rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise LmlabError(f"expert-parallel run failed (torchrun exit status {rc}); see the ranks' errors above")


def run_rank(cfg: Any) -> Path:
    """One expert-parallel rank of ``lmlab train moe`` (rank 0 writes the run directory)."""
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import seed_everything
    from lmlab.train.moe import finish, train_variant

    ep = init(cfg.backend)
    _, rank, world, dev = ep
    if world != cfg.ranks:
        from lmlab.errors import LmlabError

        raise LmlabError(f"world size {world} differs from ranks={cfg.ranks}")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from lmlab.train.moe import load_data

    if rank == 0:  # rank 0 builds and caches the corpus / token streams first
        tok, tr, va, meta = load_data(cfg)
    dist.barrier()
    if rank != 0:
        tok, tr, va, meta = load_data(cfg)
    ctx = start_run(cfg, "train-moe", device=dev, dtype=torch.float32, threads=torch.get_num_threads(),
                    extra_meta={"data": meta, "world_size": world, "backend": _backend(cfg.backend)}) \
        if rank == 0 else nullcontext(None)
    with ctx as run:
        res = train_variant(cfg, run, ep=ep, data=(tok, tr, va, meta), progress=rank == 0)
        gather_experts(res["_model"], ep)
        if rank == 0:
            finish(run, cfg, res)
    dist.barrier()
    return Path(cfg.out) if cfg.out else Path(".")


# ----------------------------------------------------------------------------------------------------
# a self-check users (and the tests) run: one layer under real EP vs the single-process simulation


def _layer_check(cases: list[tuple[Any, torch.Tensor, torch.Tensor]], hidden: int, inter: int, seed: int,
                 out_path: str) -> None:
    from lmlab.core.runs import save_tensors
    from lmlab.train.moe import MoELayer

    ep = init("gloo")
    _, rank, world, _ = ep
    saved = {}
    for i, (settings, x, g) in enumerate(cases):
        torch.manual_seed(seed)
        layer = MoELayer(hidden, inter, settings).train()
        shard_model(layer, ep)
        B = x.shape[0] // world
        xl = x[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        out = layer(xl)
        (out * g[rank * B:(rank + 1) * B]).sum().backward()
        reduce_grads(layer, ep)
        res = {"out": out.detach(), "dx": xl.grad}
        for name in ("w_in", "w_out"):
            res[name] = getattr(layer, name).grad
        for key, t in res.items():
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            saved[f"{i}.{key}"] = torch.cat(parts)
        saved[f"{i}.router"] = layer.router.weight.grad
        for k, v in layer.stats.items():
            if k not in ("capacity", "aux"):
                saved[f"{i}.stat.{k}"] = all_reduce_tensor(v.float(), ep)
    if rank == 0:
        save_tensors(out_path, saved)


def ep_layer_check(cases: list[tuple[Any, torch.Tensor, torch.Tensor]], hidden: int, inter: int, world: int,
                   out_path: str | Path, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Run :class:`~lmlab.train.moe.MoELayer` cases ``(settings, x (B, T, d), g (B, T, d))`` on ``world`` gloo
    processes (batch rows split over ranks, loss ``sum(out * g)``, weights from ``seed``) in one launch.

    Returns per case: out, dx, w_in/w_out gradients (all experts), router gradient (summed over ranks), stats.
    """
    from lmlab.core.runs import load_tensors

    path = str(out_path) if str(out_path).endswith(".safetensors") else str(out_path) + ".safetensors"
    launch(_layer_check, world, cases, hidden, inter, seed, path)
    flat = load_tensors(path)
    return [{k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(i)}
            for i in range(len(cases))]


if __name__ == "__main__":  # one torchrun rank of `lmlab train moe --nproc W` (argument: the resolved config)
    import sys

    from lmlab.config import resolve
    from lmlab.train.moe import TrainMoEConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_rank(resolve(TrainMoEConfig, sys.argv[1]))
