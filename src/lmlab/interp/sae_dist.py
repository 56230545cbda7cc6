"""Data-parallel SAE training under ``torchrun`` (gloo on CPU, NCCL on GPU): ``lmlab interp sae train`` scaled out.

Llama Scope (He et al., arXiv 2410.20526) trains its SAE suite data-parallel (``init_device_mesh(("ddp", "tp"))``);
lmlab's version keeps the single-process run **bit-for-bit the same maths** so a 2-process run equals a 1-process
run with the same seed up to float summation order:

* **Activation generation is sharded over LM batches.** The source's seeded sequence order is cut into groups of
  ``W`` LM batches; rank ``r`` runs the LM forward on batch ``r`` of each group only, then the masked activation
  rows are all-gathered (padded to equal length) and every rank appends them in rank order. Every rank therefore
  sees the *same* activation stream as a single process, so the shuffling buffer (same generator) serves the same
  global batches, while each rank paid 1/W of the LM compute.
* **SAE compute is sharded over token batches.** Each global batch ``(B, d)`` is split into W row shards
  (``torch.tensor_split``); rank r computes the loss of its shard with the *global* FVU denominator::

      L_r = sum_{n in shard r} ||y^_n - y_n||^2 / sum_{n in batch} ||y_n - mean_batch y||^2

  so ``sum_r L_r`` is exactly the single-process FVU and the **summed** (all-reduce SUM) gradients equal the
  single-process gradient. The AuxK denominator needs the residual of every row, so its sums
  ``(sum e, sum ||e||^2, n)`` are all-reduced. Firing counts (dead-latent bookkeeping) and logged losses are
  all-reduced too, so every rank takes identical Adam steps on identical parameters (same seeded init).
* Rank 0 writes the run dir, checkpoints and the final SAEs; the others train in a scratch dir that is removed.

Launch (one machine, 2 CPU processes; use ``--nproc_per_node=N_GPUS`` and ``--device cuda`` on GPUs, each rank
takes ``cuda:LOCAL_RANK``; multi-node: add ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``)::

    torchrun --nproc_per_node 2 -m lmlab interp sae train ref:dense --out runs/sae-ddp --tokens 2M
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    device: torch.device
    """Device for collectives (cuda:LOCAL_RANK under NCCL, cpu under gloo)."""

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (N, ...) -> (~N/W, ...)."""
        return torch.tensor_split(t, self.world)[self.rank]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM over ranks (moved to the collective device and back)."""
        import torch.distributed as dist

        src = t.device
        buf = t.to(self.device)
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf.to(src))
        return t

    def all_reduce_grads(self, module: torch.nn.Module) -> None:
        """SUM the gradients of every parameter (one flat buffer, one collective)."""
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.all_reduce(flat)
        off = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[off: off + n].view_as(p.grad))
            off += n

    def global_denom(self, e: torch.Tensor) -> torch.Tensor:
        """``sum_n ||e_n - mean e||^2`` over the rows of every rank: e (n_r, d) -> scalar (no gradient)."""
        with torch.no_grad():
            e = e.double()
            stats = torch.cat([e.sum(0), e.pow(2).sum().reshape(1), torch.tensor([float(e.shape[0])],
                                                                                  dtype=torch.float64,
                                                                                  device=e.device)])
            self.all_reduce(stats)
            s, ss, n = stats[:-2], stats[-2], stats[-1].clamp_min(1.0)
            return (ss - s.pow(2).sum() / n).clamp_min(1e-12).float()


def init_from_env(device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA).

    Returns ``(None, device)`` for a plain single-process run, else the context and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:
            raise LmlabError(f"cannot join the torchrun process group ({backend}): {e}") from None
    log.info("data-parallel SAE training: rank %d of %d (%s)", rank, world, backend)
    return DistContext(rank, world, device if backend == "nccl" else torch.device("cpu")), device


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_gather_rows(ctx: DistContext, rows: torch.Tensor) -> list[torch.Tensor]:
    """All-gather a (n_r, D) float tensor with n_r differing per rank -> list of W tensors, rank order."""
    import torch.distributed as dist

    n = torch.tensor([rows.shape[0]], dtype=torch.long, device=ctx.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = torch.zeros(m, rows.shape[1], dtype=rows.dtype, device=ctx.device)
    pad[: rows.shape[0]] = rows.to(ctx.device)
    out = [torch.zeros_like(pad) for _ in range(ctx.world)]
    dist.all_gather(out, pad)
    return [o[: int(s)].cpu() for o, s in zip(out, sizes)]


def token_rows(source: Any, ctx: DistContext) -> Iterator[dict[str, torch.Tensor]]:
    """Drop-in for ``LMActivationSource.token_rows`` under torchrun: the same endless stream of masked rows
    (name -> (n, d) per LM batch, same order as one process), each rank running 1 of every W LM forwards."""
    names = list(source.names)
    while True:
        group = []
        for _ in range(ctx.world):  # the next W LM batches of the seeded order (wrapping like one process)
            if source.pos >= source.n_sequences:
                source.pos, source.epochs = 0, source.epochs + 1
                log.warning("activation source: all %d sequences used; starting epoch %d", source.n_sequences,
                            source.epochs + 1)
            group.append(source._next_ids())
        ids = group[ctx.rank]
        acts = source.forward(ids)
        mask = source.mask(ids)
        mine = torch.cat([acts[n][mask] for n in names], 1)  # (n_r, sum d)
        widths = [acts[n].shape[-1] for n in names]
        for rows in _all_gather_rows(ctx, mine):
            yield dict(zip(names, rows.split(widths, 1)))
