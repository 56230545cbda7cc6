"""Induction circuits in Transformers and Mamba, and the Off-by-One motif (``lmlab interp circuits``).

Paper: *Towards Universality* (Wang et al., arXiv 2410.06672, ICLR 2025), Sec. 5: Mamba's induction circuit is
structurally analogous to a Transformer's previous-token head + induction head, but the token-mixing step runs
through the causal ``conv1d`` (kernel 4) feeding the selective SSM, with an **Off-by-One** motif: "the information
of one token is written into the SSM state in its next position".

Task: repeated random tokens ``[BOS, x_1..x_L, x_1..x_L]`` (x uniform over the vocabulary). A model with an
induction mechanism predicts the second half from the first:

    induction gain = loss(first half) - loss(second half)      (nats/token; ~0 without induction)

Transformer (per head h of layer l, attention pattern A (T, T), query positions p in the second half)::

    induction score(l, h) = mean_p A[p, p - L + 1]      (attend to the token *after* the previous occurrence)
    prev-token score(l, h) = mean_p A[p, p - 1]

Mamba: (i) **conv-lag ablation**: zero tap ``lag`` of every ``mixer.conv1d`` kernel (lag 0 = the current token;
the causal kernel's last column) in all layers, or in one layer, and measure the drop of the induction gain;
(ii) **mixer ablation** per layer (zero ``blocks.l.hook_mixer_out``: the whole SSM path of that layer);
(iii) **Off-by-One probe**: a linear (ridge, closed-form) probe reads token x_t from the mixer output at position
t + o, for offsets o = 0..max_offset; the offset with the best held-out accuracy is where the token's
information has been written. For a Transformer the same probe runs on ``hook_attn_out``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

TASKS = ("induction", "off-by-one")


# ----------------------------------------------------------------------------------------------------------
# the maths (pure)


def repeated_tokens(n_seq: int, half: int, vocab: int, seed: int = 0, bos: int | None = None,
                    low: int = 0) -> torch.Tensor:
    """(n_seq, [1 +] 2 * half) ids: a random half repeated once, with BOS first when given; tokens in [low, vocab)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, vocab, (n_seq, half), generator=g)  # (B, L)
    ids = torch.cat([x, x], 1)  # (B, 2L)
    if bos is not None:
        ids = torch.cat([torch.full((n_seq, 1), int(bos)), ids], 1)
    return ids


def half_losses(logits: torch.Tensor, ids: torch.Tensor, half: int) -> tuple[float, float]:
    """Mean next-token loss on the first and the second (repeated) half: logits (B, T, V), ids (B, T)."""
    off = ids.shape[1] - 2 * half  # 1 with BOS, else 0
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): nll[t] predicts ids[t+1]
    first = nll[:, off: off + half - 1]  # targets x_2..x_L (x_1 is unpredictable)
    second = nll[:, off + half: off + 2 * half - 1]  # targets of the repeat x_2..x_L (x_1 of the repeat too soon)
    return float(first.mean()), float(second.mean())


def induction_scores(pattern: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pattern (B, H, T, T) of ``[BOS?, x, x]`` -> (induction (H,), previous-token (H,)) attention scores."""
    T = pattern.shape[-1]
    q = torch.arange(T - half + 1, T)  # second-half query positions whose target follows a previous occurrence
    ind = pattern[:, :, q, q - half + 1].mean((0, 2))  # (H,)
    prev = pattern[:, :, q, q - 1].mean((0, 2))  # (H,)
    return ind, prev


def ridge_probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float = 1e-2,
                         train_frac: float = 0.7) -> float:
    """Held-out accuracy of a closed-form ridge classifier (least squares onto one-hot): x (N, d), y (N,)."""
    n = x.shape[0]
    n_tr = int(n * train_frac)
    if n_tr < 2 or n - n_tr < 1:
        raise LmlabError(f"too few probe samples ({n})")
    x = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)  # (N, d+1) with a bias column
    xt, yt = x[:n_tr], y[:n_tr]
    mu, sd = xt[:, :-1].mean(0), xt[:, :-1].std(0).clamp_min(1e-8)
    x = torch.cat([(x[:, :-1] - mu) / sd, x[:, -1:]], 1)
    xt = x[:n_tr]
    onehot = torch.nn.functional.one_hot(yt, n_classes).double()  # (n_tr, C)
    w = torch.linalg.solve(xt.T @ xt + lam * n_tr * torch.eye(x.shape[1], dtype=torch.float64), xt.T @ onehot)
    pred = (x[n_tr:] @ w).argmax(1)
    return float((pred == y[n_tr:]).double().mean())


def offset_probe(acts: torch.Tensor, ids: torch.Tensor, offsets: list[int], n_classes: int, start: int = 1,
                 lam: float = 1e-2) -> list[float]:
    """Accuracy of decoding token ids[t] from acts[t + o] for each offset o: acts (B, T, d), ids (B, T)."""
    T = ids.shape[1]
    out = []
    for o in offsets:
        t = torch.arange(start, T - max(offsets))  # same target positions for every offset
        x = acts[:, t + o].reshape(-1, acts.shape[-1])
        y = ids[:, t].reshape(-1)
        out.append(ridge_probe_accuracy(x, y, n_classes, lam))
    return out


@contextmanager
def conv_taps_zeroed(model: torch.nn.Module, lag: int, layers: list[int] | None = None):
    """Zero tap ``lag`` (0 = current token) of every Mamba ``mixer.conv1d`` kernel (in ``layers``, default all)."""
    convs = mamba_convs(model)
    chosen = [c for i, c in enumerate(convs) if layers is None or i in layers]
    saved = []
    with torch.no_grad():
        for c in chosen:
            k = c.weight.shape[-1]
            if not 0 <= lag < k:
                raise LmlabError(f"conv lag {lag} out of range 0..{k - 1}")
            saved.append(c.weight[..., k - 1 - lag].clone())
            c.weight[..., k - 1 - lag] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for c, w in zip(chosen, saved):
                c.weight[..., c.weight.shape[-1] - 1 - lag] = w


def mamba_convs(model: torch.nn.Module) -> list[torch.nn.Conv1d]:
    """The causal depthwise conv of each Mamba(-2) mixer, in layer order ([] for other architectures)."""
    return [m.conv1d for name, m in model.named_modules() if name.endswith("mixer") and hasattr(m, "conv1d")]


def tiny_config(arch: str, vocab: int, d: int = 64, n_layers: int = 2) -> Any:
    """Small Llama (``dense``) or Mamba-2 (``mamba``) configs for the synthetic induction task."""
    from transformers import LlamaConfig, Mamba2Config

    if arch == "dense":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=2 * d, max_position_embeddings=256,
                          tie_word_embeddings=True)
        cfg._attn_implementation = "eager"
        return cfg
    if arch == "mamba":
        return Mamba2Config(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, state_size=16,
                            head_dim=16, num_heads=2 * d // 16, expand=2, n_groups=1, chunk_size=32, conv_kernel=4,
                            tie_word_embeddings=True)
    raise LmlabError(f"unknown arch {arch!r}; choose dense or mamba")


def train_induction_model(arch: str, vocab: int = 64, half: int = 16, steps: int = 600, batch: int = 32,
                          lr: float = 3e-3, seed: int = 0, d: int = 64, n_layers: int = 2) -> torch.nn.Module:
    """Train a small model from scratch on fresh repeated random sequences (token 0 = BOS): AdamW, cosine lr,
    loss on every position. Induction forms when the second-half loss drops far below ln(vocab)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, d, n_layers)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        ids = repeated_tokens(batch, half, vocab, seed=seed * 100_003 + step, bos=0, low=1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log.info("%s step %d loss %.3f", arch, step + 1, float(loss.detach()))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# the command


@dataclass
class CircuitsConfig(RunArgs):
    """Induction circuits (Transformer heads; Mamba conv-lag / mixer ablations) and the Off-by-One probe."""

    model: str = "ref:dense"
    """Model: ref:dense, ref:mamba, a HF name or a local path."""
    task: str = "induction"
    """induction (scores + ablations + probe) | off-by-one (probe only)."""
    half_len: int = 32
    """Length L of the random half (sequence = BOS + 2L tokens)."""
    n_seq: int = 64
    """Number of repeated random sequences."""
    batch_size: int = 16
    """Sequences per forward."""
    max_offset: int = 3
    """Off-by-One probe offsets 0..max_offset."""
    probe_vocab: int = 64
    """Random tokens for the probe are drawn from this many ids (a small class count keeps the probe fast)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.half_len < 4 or self.n_seq < 2 or self.batch_size < 1 or self.max_offset < 1:
            raise ConfigError("need half_len >= 4, n_seq >= 2, batch_size >= 1, max_offset >= 1")


def _forward(model: Any, ids: torch.Tensor, bs: int, names: list[str] = ()) -> tuple[torch.Tensor, dict]:
    from lmlab.core.hooks import capture

    dev = next(model.parameters()).device
    logits, acts = [], {n: [] for n in names}
    with torch.no_grad():
        for s in range(0, ids.shape[0], bs):
            with capture(model, list(names), to_cpu=True) if names else _null() as got:
                logits.append(model(input_ids=ids[s: s + bs].to(dev)).logits.float().cpu())
            for n in names:
                acts[n].append(got[n].float())
    return torch.cat(logits), {n: torch.cat(v) for n, v in acts.items()}


@contextmanager
def _null():
    yield {}


def analyze(model: Any, cfg: CircuitsConfig, vocab: int, bos: int | None) -> dict[str, Any]:
    """All measurements on one model (no I/O): induction gain, per-head scores or ablations, Off-by-One probe."""
    from lmlab.core.hooks import hook_names, n_layers, patch

    names = hook_names(model)
    n_l = n_layers(model)
    is_mamba = bool(mamba_convs(model))
    low = 3 if vocab > 16 else 0  # skip the usual special ids
    ids = repeated_tokens(cfg.n_seq, cfg.half_len, vocab, cfg.seed, bos, low)
    res: dict[str, Any] = {"architecture": "mamba" if is_mamba else "transformer", "n_layers": n_l}
    pat = [f"blocks.{i}.attn.hook_pattern" for i in range(n_l) if f"blocks.{i}.attn.hook_pattern" in names]
    if cfg.task == "induction":
        logits, acts = _forward(model, ids, cfg.batch_size, pat)
        f, s = half_losses(logits, ids, cfg.half_len)
        res.update(loss_first=f, loss_second=s, induction_gain=f - s)
        if pat:
            ind, prev = zip(*(induction_scores(acts[n], cfg.half_len) for n in pat))
            res["induction_scores"] = [x.tolist() for x in ind]  # (layers, heads)
            res["prev_token_scores"] = [x.tolist() for x in prev]
            flat = torch.stack(ind)
            li, hi = divmod(int(flat.argmax()), flat.shape[1])
            res["top_induction_head"] = {"layer": li, "head": hi, "score": float(flat.max())}
            res["induction_heads"] = [[i, h] for i in range(flat.shape[0]) for h in range(flat.shape[1])
                                      if flat[i, h] > 0.3]
        if is_mamba:
            k = mamba_convs(model)[0].weight.shape[-1]
            res["conv_lag_ablation"] = {}
            for lag in range(k):
                with conv_taps_zeroed(model, lag):
                    lg, _ = _forward(model, ids, cfg.batch_size)
                f2, s2 = half_losses(lg, ids, cfg.half_len)
                res["conv_lag_ablation"][str(lag)] = {"induction_gain": f2 - s2, "loss_first": f2, "loss_second": s2}
            res["conv_lag_by_layer"] = []
            for layer in range(n_l):
                row = []
                for lag in range(k):
                    with conv_taps_zeroed(model, lag, [layer]):
                        lg, _ = _forward(model, ids, cfg.batch_size)
                    f2, s2 = half_losses(lg, ids, cfg.half_len)
                    row.append(f2 - s2)
                res["conv_lag_by_layer"].append(row)
            # L2 norm over channels of each tap, lag 0 = current token: (layers, lags)
            res["conv_tap_norm"] = [c.weight.detach().float().flip(-1).reshape(-1, k).norm(dim=0).tolist()
                                    for c in mamba_convs(model)]
            gains = {int(k_): v["induction_gain"] for k_, v in res["conv_lag_ablation"].items()}
            res["most_destructive_lag"] = min(gains, key=gains.get)
        comp = "hook_mixer_out" if is_mamba else "hook_attn_out"
        res["layer_ablation"] = {}
        for layer in range(n_l):
            with patch(model, {f"blocks.{layer}.{comp}": lambda x, _n: torch.zeros_like(x)}):
                lg, _ = _forward(model, ids, cfg.batch_size)
            f2, s2 = half_losses(lg, ids, cfg.half_len)
            res["layer_ablation"][f"blocks.{layer}.{comp}"] = f2 - s2
    # Off-by-One probe on random (non-repeated) tokens from a small id range
    comp = "hook_mixer_out" if is_mamba else "hook_attn_out"
    probe_names = [f"blocks.{i}.{comp}" for i in range(n_l)]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    pv = min(cfg.probe_vocab, vocab - low)
    pids = torch.randint(low, low + pv, (cfg.n_seq, 2 * cfg.half_len + 1), generator=g)
    if bos is not None:
        pids[:, 0] = bos
    _, pacts = _forward(model, pids, cfg.batch_size, probe_names)
    offsets = list(range(cfg.max_offset + 1))
    probe = {n: offset_probe(pacts[n], pids - low, offsets, pv) for n in probe_names}
    res["off_by_one"] = {"component": comp, "offsets": offsets, "accuracy": probe, "chance": 1.0 / pv,
                         "peak_offset": {n: int(np.argmax(v)) for n, v in probe.items()}}
    return res


def main(cfg: CircuitsConfig) -> Path:
    """``lmlab interp circuits MODEL --task induction|off-by-one``."""
    from lmlab.core.models import load
    from lmlab.core.plotting import bar_plot, heatmap, line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load(cfg.model, dev, dtype, cfg.trust_remote_code, attn_implementation=None)
    if not mamba_convs(model):  # attention patterns need eager attention
        model, tok = load(cfg.model, dev, dtype, cfg.trust_remote_code, attn_implementation="eager")
    vocab = int(model.config.vocab_size)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with start_run(cfg, "interp-circuits", device=dev, dtype=dtype, threads=threads) as run:
        res = analyze(model, cfg, vocab, bos)
        res["model"] = cfg.model
        if "induction_scores" in res:
            m = np.array(res["induction_scores"])
            heatmap(run.plots / "induction_scores.png", m, title="induction score per head", xlabel="head",
                    ylabel="layer", vmin=0, vmax=1)
        if "conv_lag_ablation" in res:
            lags = list(res["conv_lag_ablation"])
            bar_plot(run.plots / "conv_lag_ablation.png", [f"lag {lag}" for lag in lags],
                     {"ablated": [res["conv_lag_ablation"][lag]["induction_gain"] for lag in lags],
                      "clean": [res["induction_gain"]] * len(lags)},
                     title="induction gain with a conv tap zeroed (all layers)", ylabel="nats/token")
        obo = res["off_by_one"]
        line_plot(run.plots / "off_by_one.png", {n: obo["offsets"] for n in obo["accuracy"]}, obo["accuracy"],
                  title=f"decode x_t from {obo['component']} at t + offset", xlabel="offset", ylabel="accuracy")
        run.finish(res)
    return run.path


# ----------------------------------------------------------------------------------------------------------
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """``lmlab tour`` universality section. Quick: MPPC on synthetic 'models' sharing sparse codes vs independent
    codes, and a small Transformer trained on repeated random tokens with its induction heads. ``--full`` adds the
    Mamba-2 induction model (conv-lag ablation + Off-by-One probe)."""
    from lmlab.config import RunArgs
    from lmlab.core.plotting import heatmap
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.sae import SAE, dataset_scale, train_step
    from lmlab.interp.similarity import mppc, pearson_matrix, summarize, synthetic_codes

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    lines = []
    with start_run(sub, "tour-universality", device=dev, dtype=dtype, threads=threads) as run:
        codes, xa = synthetic_codes(20_000, 48, 32, p=0.04, seed=cfg.seed + 1)
        _, xb = synthetic_codes(20_000, 48, 32, seed=cfg.seed + 2, codes=codes)
        _, xc = synthetic_codes(20_000, 48, 32, p=0.04, seed=cfg.seed + 3)
        feats = []
        for i, x in enumerate((xa, torch.tanh(xb), xc)):
            g = torch.Generator().manual_seed(cfg.seed + i)
            sae = SAE(32, 96, 4).init_llama_scope(0.5, g)
            sae.scale_in.fill_(dataset_scale(x))
            sae.scale_out.fill_(dataset_scale(x))
            opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
            for _ in range(400):
                out_ = train_step(sae, (b := x[torch.randint(0, x.shape[0], (512,), generator=g)]), b, 4)
                opt.zero_grad()
                out_["loss"].backward()
                opt.step()
            with torch.no_grad():
                feats.append(sae.fold().encode(x))
        live = (feats[0] > 0).sum(0) >= 10
        same = summarize(mppc(pearson_matrix(feats[0], feats[1]))[live])
        indep = summarize(mppc(pearson_matrix(feats[0], feats[2]))[live])
        lines.append(f"Synthetic MPPC (SAE features): same codes/different dictionary mean {same['mean']:.2f} "
                     f"(>0.7: {same['frac_gt_0.7']:.0%}); independent codes mean {indep['mean']:.2f} "
                     f"(>0.7: {indep['frac_gt_0.7']:.0%}).")
        results: dict[str, Any] = {"synthetic_mppc": {"same_codes": same, "independent": indep}}
        arches = ["dense", "mamba"] if cfg.full else ["dense"]
        for arch in arches:
            model = train_induction_model(arch, steps=400 if arch == "dense" else 1500, seed=cfg.seed)
            r = analyze(model, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32, seed=cfg.seed), 64, 0)
            results[arch] = r
            lines.append(f"{arch} on repeated random tokens: loss first half {r['loss_first']:.2f}, repeat "
                         f"{r['loss_second']:.2f} nats (induction gain {r['induction_gain']:.2f}).")
            if "induction_scores" in r:
                heatmap(run.plots / "induction_scores.png", r["induction_scores"], title="induction score per head",
                        xlabel="head", ylabel="layer", vmin=0, vmax=1)
                lines.append(f"  induction heads (score > 0.3, [layer, head]): {r['induction_heads']}")
            if "conv_lag_ablation" in r:
                gains = {k: round(v["induction_gain"], 3) for k, v in r["conv_lag_ablation"].items()}
                lines.append(f"  induction gain with conv lag zeroed: {gains}; Off-by-One peak offsets: "
                             f"{r['off_by_one']['peak_offset']}")
        run.finish(results)
    return run.path, "\n".join(lines)
