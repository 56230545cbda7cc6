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
(iii) the same by SSM input channel (x = value, B = key, C = query): ``key_lag`` is the lag whose key taps
induction needs most (1 = the Off-by-One motif).

Both: **path patching** (clean ``[BOS, x, x]`` vs corrupted ``[BOS, x', x]``; sender -> receiver along the direct
path, every other node frozen; see the section below) and the **Off-by-One write-offset profile**: the change of
what a layer writes into its memory (KV cache; SSM key B / value x / query C) at s + o when only the layer's input
at s changes, with a ridge probe decoding x_t from the same channel at t + o next to it.
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
def conv_taps_zeroed(model: torch.nn.Module, lag: int, layers: list[int] | None = None, channel: str | None = None):
    """Zero tap ``lag`` (0 = current token) of every Mamba ``mixer.conv1d`` kernel (in ``layers``, default all);
    ``channel`` (Mamba-2: x | B | C) restricts it to the conv channels feeding the SSM value, key or query."""
    convs = mamba_convs(model)
    mixers = [m for name, m in model.named_modules() if name.endswith("mixer") and hasattr(m, "conv1d")]
    chosen = [(c, mx) for i, (c, mx) in enumerate(zip(convs, mixers)) if layers is None or i in layers]
    saved = []
    with torch.no_grad():
        for c, mx in chosen:
            k = c.weight.shape[-1]
            if not 0 <= lag < k:
                raise LmlabError(f"conv lag {lag} out of range 0..{k - 1}")
            rows = slice(None)
            if channel is not None:
                if not hasattr(mx, "intermediate_size") or channel not in ("x", "B", "C"):
                    raise LmlabError(f"conv channel {channel!r}: needs a Mamba-2 mixer and one of x, B, C")
                sl, i = mamba_channels(mx)[channel], mx.intermediate_size
                rows = slice(sl.start - i, sl.stop - i)  # conv channels = in_proj's x|B|C block
            saved.append((rows, c.weight[rows, ..., k - 1 - lag].clone()))
            c.weight[rows, ..., k - 1 - lag] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for (c, _), (rows, w) in zip(chosen, saved):
                c.weight[rows, ..., c.weight.shape[-1] - 1 - lag] = w


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


def induction_stream(n_tokens: int, vocab: int, half: tuple[int, int] = (8, 24), seed: int = 0,
                     bos: int = 0, low: int = 1) -> np.ndarray:
    """A packed token stream of blocks ``[BOS, x, x]`` with x uniform over [low, vocab) and a half length drawn
    uniformly from ``half`` (inclusive) per block: a varying L rules out the purely positional shortcut
    "attend L - 1 back" (with a fixed L a RoPE head can copy without any previous-token information)."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < n_tokens:
        h = int(rng.integers(half[0], half[1] + 1))
        x = rng.integers(low, vocab, h)
        out.append(np.concatenate([[bos], x, x]))
        n += 2 * h + 1
    return np.concatenate(out)[:n_tokens].astype(np.int64)


LOOPS = ("pretrain", "aligned")


def train_induction_model(arch: str, vocab: int = 64, half: int = 16, steps: int = 600, batch: int = 16,
                          lr: float = 3e-3, seed: int = 0, d: int = 64, n_layers: int = 2,
                          seq_len: int = 64, half_range: tuple[int, int] | None = None,
                          loop: str = "pretrain") -> torch.nn.Module:
    """Train a small model from scratch on repeated random blocks (token 0 = BOS). Half lengths vary over
    ``half_range`` (default half/2 .. 3*half/2). Induction forms when the second-half loss drops far below ln(vocab).

    ``loop="pretrain"``: the foundation loop (``lmlab.core.pretrain.train``: AdamW (0.9, 0.95), warm-up + cosine,
    clipping) on a packed stream read in random windows of ``seq_len`` tokens. ``loop="aligned"``: a short local
    AdamW + one-cycle loop on whole ``[BOS, x, x]`` sequences (2 * batch per step), which a 2-layer Mamba-2 needs
    on CPU budgets (3000 steps: induction gain 3.9 nats vs 0.95 with the foundation loop, see BENCHMARKS.md)."""
    from transformers import AutoModelForCausalLM

    from lmlab.core.pretrain import OptimConfig, train

    if loop not in LOOPS:
        raise LmlabError(f"loop must be one of {list(LOOPS)}, got {loop!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, d, n_layers))
    hr = half_range or (max(2, half // 2), half + half // 2)
    if loop == "aligned":
        model.train()
        opt_ = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt_, lr, total_steps=steps, pct_start=0.1)
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            h = int(torch.randint(hr[0], hr[1] + 1, (1,), generator=g))
            ids = repeated_tokens(2 * batch, h, vocab, seed=seed * 100_003 + step, bos=0, low=1)
            loss = model(input_ids=ids, labels=ids).loss
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt_.step()
            sched.step()
        return model.eval()
    stream = induction_stream(steps * batch * (seq_len + 1) // 4 + 10 * seq_len, vocab, hr, seed=seed)
    opt = OptimConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup=max(1, steps // 20),
                      weight_decay=0.01, eval_every=0, log_every=max(1, steps // 10))
    st = train(model, stream, None, opt, seed=seed, progress=False)
    log.info("%s: %d steps, final loss %.3f", arch, steps, st.losses[-1])
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# path patching (Wang et al. 2022 "IOI" method, used by Towards Universality Sec. 5 on Mamba)
#
# Clean run X (``[BOS, x, x]``) and corrupted run X' (``[BOS, x', x]``: the first half resampled, so the repeat has
# nothing to copy). A *path* sender -> receiver is patched in three steps:
#   1. cache both runs;
#   2. delta = sender(X') - sender(X): the sender's output change, written into the residual stream (B, T, d);
#      only the direct path counts: every other node stays at its clean value (frozen);
#   3. the receiver's input is recomputed from resid_pre_clean(receiver layer) + delta; a final clean run uses it
#      for the receiver only (a head's q/k/v, or one channel of a Mamba-2 in_proj: x | B | C | dt), and
#      everything downstream of the receiver is recomputed.
# Effect (second-half loss, 0 = no effect, 1 = as bad as the corrupted run):
#   effect = (loss_patched - loss_clean) / (loss_corrupt - loss_clean)


def corrupted_pair(n_seq: int, half: int, vocab: int, seed: int = 0, bos: int | None = None,
                   low: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, corrupt) ids: clean ``[BOS, x, x]``; corrupt ``[BOS, x', x]`` with a fresh first half x'."""
    clean = repeated_tokens(n_seq, half, vocab, seed, bos, low)
    g = torch.Generator().manual_seed(seed + 7919)
    corrupt = clean.clone()
    off = clean.shape[1] - 2 * half
    corrupt[:, off: off + half] = torch.randint(low, vocab, (n_seq, half), generator=g)
    return clean, corrupt


def second_half_loss(logits: torch.Tensor, ids: torch.Tensor, half: int) -> float:
    """Mean loss on the repeat (the induction targets): logits (B, T, V), ids (B, T)."""
    return half_losses(logits, ids, half)[1]


def _layer(model: torch.nn.Module, i: int) -> torch.nn.Module:
    from lmlab.core.hooks import resolve

    return resolve(model, f"blocks.{i}.hook_resid_pre")[0].module


def _attn(layer: torch.nn.Module) -> torch.nn.Module:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise LmlabError("path patching supports Llama-style attention (q/k/v/o_proj) and Mamba-2 mixers")
    return attn


def mamba_channels(mixer: torch.nn.Module) -> dict[str, slice]:
    """Slices of a Mamba-2 ``in_proj`` output: gate z, SSM value x, key B, query C (x|B|C pass the conv), dt."""
    i, gn, h = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size, mixer.num_heads
    return {"gate": slice(0, i), "x": slice(i, 2 * i), "B": slice(2 * i, 2 * i + gn),
            "C": slice(2 * i + gn, 2 * i + 2 * gn), "dt": slice(2 * i + 2 * gn, 2 * i + 2 * gn + h),
            "all": slice(0, 2 * i + 2 * gn + h)}


def _head_slice(attn: torch.nn.Module, channel: str, head: int | None, n_out: int) -> slice:
    if head is None:
        return slice(0, n_out)
    hd = n_out // (attn.config.num_attention_heads if channel == "q" else attn.config.num_key_value_heads)
    kv = head if channel == "q" else head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    return slice(kv * hd, (kv + 1) * hd)


def run_cache(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """One forward: logits, resid_pre of every layer, the embedding, and each layer's sender output: the
    per-head attention output z (o_proj input, (B, T, H*hd)) or the Mamba mixer output (B, T, d)."""
    from contextlib import ExitStack

    from lmlab.core.hooks import capture, n_layers

    n_l = n_layers(model)
    mamba = bool(mamba_convs(model))
    z: dict[int, torch.Tensor] = {}
    names = ["hook_embed"] + [f"blocks.{i}.hook_resid_pre" for i in range(n_l)]
    names += [f"blocks.{i}.hook_mixer_out" for i in range(n_l)] if mamba else []
    with torch.no_grad(), ExitStack() as stack:
        if not mamba:
            for i in range(n_l):
                def pre(_m, args, i=i):
                    z[i] = args[0].detach()
                h = _attn(_layer(model, i)).o_proj.register_forward_pre_hook(pre)
                stack.callback(h.remove)
        got = stack.enter_context(capture(model, names))
        logits = model(input_ids=ids).logits.float()
    return {"logits": logits, "embed": got["hook_embed"],
            "resid_pre": [got[f"blocks.{i}.hook_resid_pre"] for i in range(n_l)],
            "out": [got[f"blocks.{i}.hook_mixer_out"] for i in range(n_l)] if mamba else [z[i] for i in range(n_l)]}


def sender_delta(model: torch.nn.Module, clean: dict, corrupt: dict, sender: tuple,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """Residual-stream change (B, T, d) written by ``sender``: ("embed",), ("layer", l) (a whole attention /
    mixer output) or ("head", l, h); ``positions`` (T,) bool keeps the change at those positions only."""
    kind = sender[0]
    if kind == "embed":
        d = corrupt["embed"] - clean["embed"]
    elif kind in ("layer", "head"):
        layer = sender[1]
        d = corrupt["out"][layer] - clean["out"][layer]  # (B, T, d) mixer out, or (B, T, H*hd) per-head z
        if not mamba_convs(model):
            o = _attn(_layer(model, layer)).o_proj
            if kind == "head":
                hd = o.weight.shape[1] // _attn(_layer(model, layer)).config.num_attention_heads
                keep = torch.zeros(d.shape[-1], dtype=d.dtype)
                keep[sender[2] * hd: (sender[2] + 1) * hd] = 1
                d = d * keep
            d = d @ o.weight.T  # (B, T, d): W_O applied to the head's change (no bias: it cancels)
        elif kind == "head":
            raise LmlabError("Mamba has no heads to patch; use ('layer', l)")
    else:
        raise LmlabError(f"unknown sender {sender!r}")
    if positions is not None:
        d = d * positions[None, :, None].to(d.dtype)
    return d


@contextmanager
def _receivers_patched(model: torch.nn.Module, clean: dict, delta: torch.Tensor, receivers: list[tuple]):
    """Hooks that make each receiver (layer, head | None, channel) see resid_pre_clean + delta."""
    handles = []
    mamba = bool(mamba_convs(model))
    try:
        for layer, head, channel in receivers:
            blk = _layer(model, layer)
            x = clean["resid_pre"][layer] + delta  # (B, T, d)
            with torch.no_grad():
                if mamba:
                    mod = blk.mixer.in_proj
                    new = mod(blk.norm(x.to(blk.norm.weight.dtype)))  # (B, T, in_proj out)
                    sl = mamba_channels(blk.mixer)[channel]
                else:
                    attn = _attn(blk)
                    mod = getattr(attn, f"{channel}_proj")
                    new = mod(blk.input_layernorm(x))
                    sl = _head_slice(attn, channel, head, new.shape[-1])

            def hook(_m, _args, out, new=new, sl=sl):
                out = out.clone()
                out[..., sl] = new[..., sl].to(out.dtype)
                return out

            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def path_patch(model: torch.nn.Module, clean_ids: torch.Tensor, clean: dict, corrupt: dict, sender: tuple,
               receivers: list[tuple], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the clean run with the path sender -> receivers patched from the corrupted run."""
    delta = sender_delta(model, clean, corrupt, sender, positions)
    for layer, _, channel in receivers:
        if sender[0] != "embed" and layer <= sender[1]:
            raise LmlabError(f"receiver layer {layer} must come after sender layer {sender[1]}")
        if channel not in (("x", "B", "C", "dt", "all") if mamba_convs(model) else ("q", "k", "v")):
            raise LmlabError(f"unknown receiver channel {channel!r}")
    with _receivers_patched(model, clean, delta, receivers), torch.no_grad():
        return model(input_ids=clean_ids).logits.float()


def path_patching(model: torch.nn.Module, half: int, vocab: int, n_seq: int = 64, seed: int = 0,
                  bos: int | None = None, low: int = 0) -> dict[str, Any]:
    """The induction circuit by path patching. Transformer: senders = embeddings and every head of every layer
    but the last, receivers = every later layer's heads by input (q / k / v), all heads of that layer together,
    plus a heads x heads matrix through the keys. Mamba: senders = embeddings and each mixer (all positions,
    first half only, second half only), receivers = each later mixer by in_proj channel (x, B, C, dt, all)."""
    from lmlab.core.hooks import n_layers

    n_l = n_layers(model)
    mamba = bool(mamba_convs(model))
    clean_ids, corr_ids = corrupted_pair(n_seq, half, vocab, seed, bos, low)
    cc, kc = run_cache(model, clean_ids), run_cache(model, corr_ids)
    l_clean = second_half_loss(cc["logits"], clean_ids, half)
    l_corr = second_half_loss(kc["logits"], clean_ids, half)  # corrupted run scored on the clean targets
    normalized = l_corr - l_clean > 0.1  # a model without induction: report raw nats instead of a ratio ~ x/0
    span = l_corr - l_clean if normalized else 1.0

    def effect(sender, receivers, positions=None) -> float:
        lg = path_patch(model, clean_ids, cc, kc, sender, receivers, positions)
        return (second_half_loss(lg, clean_ids, half) - l_clean) / span

    res: dict[str, Any] = {"loss_clean": l_clean, "loss_corrupt": l_corr, "normalized": normalized,
                           "unit": "fraction of the corrupted run's loss increase" if normalized else
                           "nats (the corruption barely changes the loss: no induction to patch)", "paths": {}}
    off = clean_ids.shape[1] - 2 * half
    T = clean_ids.shape[1]
    first = torch.zeros(T, dtype=torch.bool)
    first[off: off + half] = True
    if mamba:
        chans = ("x", "B", "C", "dt", "all")
        senders = [("embed",)] + [("layer", i) for i in range(n_l - 1)]
        for s in senders:
            name = "embed" if s[0] == "embed" else f"mixer{s[1]}"
            for m in range(0 if s[0] == "embed" else s[1] + 1, n_l):
                for c in chans:
                    res["paths"][f"{name}->mixer{m}.{c}"] = effect(s, [(m, None, c)])
                for part, pos in (("first_half", first), ("second_half", ~first)):
                    res["paths"][f"{name}[{part}]->mixer{m}.all"] = effect(s, [(m, None, "all")], pos)
    else:
        n_h = _attn(_layer(model, 0)).config.num_attention_heads
        for m in range(n_l):
            for c in ("q", "k", "v"):
                recv = [(m, h, c) for h in range(n_h)]
                res["paths"][f"embed->L{m}.{c}"] = effect(("embed",), recv)
                for i in range(m):
                    res["paths"][f"L{i}->L{m}.{c}"] = effect(("layer", i), recv)
                    for h in range(n_h):
                        res["paths"][f"L{i}H{h}->L{m}.{c}"] = effect(("head", i, h), recv)
        if n_l >= 2:  # heads -> heads through the keys, last layer's receivers one at a time
            m = n_l - 1
            res["heads_to_heads_k"] = {"receiver_layer": m, "sender_layer": m - 1,
                                       "effect": [[effect(("head", m - 1, hs), [(m, hr, "k")]) for hr in range(n_h)]
                                                  for hs in range(n_h)]}
    top = max(res["paths"], key=lambda k: res["paths"][k])
    res["top_path"] = {"path": top, "effect": res["paths"][top]}
    return res


# ----------------------------------------------------------------------------------------------------------
# Off-by-One: at which position does a token enter a layer's memory write?
#
# For layer m, swap only the layer's input at position s (resid_pre[s] from a run whose token s differs; every
# other position keeps its clean value) and measure, for offsets o = 0..K-1, the relative change of what the
# layer writes into its memory at position s + o:
#     Transformer: k and v (the KV cache; q for reference)           -- change only at o = 0 by construction
#     Mamba-2:     the SSM key B, value x and query C after the causal conv (kernel K), and dt
#     profile(o) = mean_s ||W(s + o)' - W(s + o)|| / mean_t ||W(t)||
# Off-by-One (the paper's motif) = the key B changes most at o = 1: the token is written into the SSM state at
# the next position. The probe view: a ridge probe decodes token x_t from the same channel at t + o.


def _causal_conv(mixer: torch.nn.Module, xbc: torch.Tensor) -> torch.Tensor:
    """Mamba-2 depthwise causal conv + activation, as the HF mixer computes it: (B, T, C) -> (B, T, C)."""
    k = mixer.conv1d.weight.shape[-1]
    out = torch.nn.functional.conv1d(xbc.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=k - 1,
                                     groups=xbc.shape[-1])[..., : xbc.shape[1]]
    return torch.nn.functional.silu(out).transpose(1, 2)


def memory_writes(model: torch.nn.Module, layer: int, resid: torch.Tensor) -> dict[str, torch.Tensor]:
    """What layer ``layer`` writes into its memory at each position, from its input resid (B, T, d)."""
    blk = _layer(model, layer)
    with torch.no_grad():
        if mamba_convs(model):
            mx = blk.mixer
            proj = mx.in_proj(blk.norm(resid.to(blk.norm.weight.dtype))).float()  # (B, T, P)
            ch = mamba_channels(mx)
            i = mx.intermediate_size
            xbc = _causal_conv(mx, proj[..., ch["x"].start: ch["C"].stop])  # (B, T, conv_dim)
            gn = mx.n_groups * mx.ssm_state_size
            dt = torch.nn.functional.softplus(proj[..., ch["dt"]] + mx.dt_bias.float())  # (B, T, H)
            return {"x": xbc[..., :i], "B": xbc[..., i: i + gn], "C": xbc[..., i + gn:], "dt": dt}
        attn = _attn(blk)
        n = blk.input_layernorm(resid)
        return {c: getattr(attn, f"{c}_proj")(n).float() for c in ("k", "v", "q")}


def write_offsets(model: torch.nn.Module, ids: torch.Tensor, n_offsets: int = 4, seed: int = 0, low: int = 0,
                  vocab: int | None = None) -> list[dict[str, list[float]]]:
    """Per layer: relative change of each memory-write channel at s + o when only that layer's input at s is
    swapped (to its value for another token at s), averaged over positions s and sequences; o = 0..n_offsets-1."""
    vocab = vocab or int(model.config.vocab_size)
    clean = run_cache(model, ids)["resid_pre"]
    g = torch.Generator().manual_seed(seed + 31)
    T = ids.shape[1]
    s_all = list(range(1, T - n_offsets + 1))
    w0 = [memory_writes(model, m, r) for m, r in enumerate(clean)]
    scale = [{c: float(w.norm(dim=-1).mean()) for c, w in wm.items()} for wm in w0]
    prof = [{c: [0.0] * n_offsets for c in wm} for wm in w0]
    for s in s_all:
        alt = ids.clone()
        shift = torch.randint(1, vocab - low, (ids.shape[0],), generator=g)
        alt[:, s] = (ids[:, s] - low + shift) % (vocab - low) + low  # another token at s only
        alt_pre = run_cache(model, alt)["resid_pre"]
        for m in range(len(clean)):
            r = clean[m].clone()
            r[:, s] = alt_pre[m][:, s]  # the layer's input changes at s only
            w1 = memory_writes(model, m, r)
            for c in w0[m]:
                for o in range(n_offsets):
                    diff = (w1[c][:, s + o] - w0[m][c][:, s + o]).norm(dim=-1).mean()
                    prof[m][c][o] += float(diff) / max(scale[m][c], 1e-12) / len(s_all)
    return prof


def off_by_one(model: torch.nn.Module, n_seq: int, length: int, vocab: int, n_offsets: int = 4, seed: int = 0,
               bos: int | None = None, low: int = 0, probe_vocab: int = 32, n_swap: int = 16) -> dict[str, Any]:
    """Off-by-One per layer: write-offset profiles (causal) and probe accuracy of x_t from each channel at t+o."""
    from lmlab.core.hooks import n_layers

    g = torch.Generator().manual_seed(seed + 1)
    pv = min(probe_vocab, vocab - low)
    ids = torch.randint(low, low + pv, (n_seq, length), generator=g)
    if bos is not None:
        ids[:, 0] = bos
    cache = run_cache(model, ids)
    offsets = list(range(n_offsets))
    res: dict[str, Any] = {"offsets": offsets, "chance": 1.0 / pv, "layers": []}
    profs = write_offsets(model, ids[:n_swap], n_offsets, seed, low, low + pv)
    for layer in range(n_layers(model)):
        prof = profs[layer]
        writes = memory_writes(model, layer, cache["resid_pre"][layer])
        probe = {c: offset_probe(w, ids - low, offsets, pv) for c, w in writes.items() if c != "dt"}
        res["layers"].append({"write_change": prof, "peak_offset": {c: int(np.argmax(v)) for c, v in prof.items()},
                              "probe_accuracy": probe,
                              "probe_peak_offset": {c: int(np.argmax(v)) for c, v in probe.items()}})
    key = "B" if mamba_convs(model) else "k"
    res["key_channel"] = key
    res["key_peak_offset"] = [lay["peak_offset"][key] for lay in res["layers"]]
    return res


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
    n_swap: int = 16
    """Sequences used for the Off-by-One write-offset measurement (one forward per position)."""
    paths: bool = True
    """Run path patching (task induction): clean [BOS, x, x] vs corrupted [BOS, x', x]."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.half_len < 4 or self.n_seq < 2 or self.batch_size < 1 or self.max_offset < 1 or self.n_swap < 1:
            raise ConfigError("need half_len >= 4, n_seq >= 2, batch_size >= 1, max_offset >= 1, n_swap >= 1")


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
            if hasattr(_layer(model, 0).mixer, "intermediate_size"):  # Mamba-2: lag x SSM input channel
                res["conv_lag_by_channel"] = {}
                for ch in ("x", "B", "C"):
                    row = []
                    for lag in range(k):
                        with conv_taps_zeroed(model, lag, channel=ch):
                            lg, _ = _forward(model, ids, cfg.batch_size)
                        f2, s2 = half_losses(lg, ids, cfg.half_len)
                        row.append(f2 - s2)
                    res["conv_lag_by_channel"][ch] = row  # induction gain with that tap zeroed, all layers
                kb = res["conv_lag_by_channel"]["B"]
                res["key_lag"] = int(np.argmin(kb))  # the lag whose key taps induction needs most (1 = Off-by-One)
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
        if cfg.paths:
            res["path_patching"] = path_patching(model, cfg.half_len, vocab, cfg.n_seq, cfg.seed, bos, low)
    # Off-by-One on random (non-repeated) tokens from a small id range
    res["off_by_one"] = off_by_one(model, cfg.n_seq, 2 * cfg.half_len + 1, vocab, cfg.max_offset + 1, cfg.seed,
                                   bos, low, cfg.probe_vocab, cfg.n_swap)
    return res


def plot_off_by_one(path: Path, obo: dict[str, Any], title: str) -> None:
    """Relative change of the memory key (Mamba: SSM B; Transformer: k) at s + o, one bar group per layer."""
    from lmlab.core.plotting import bar_plot

    key = obo["key_channel"]
    series = {f"layer {i}": lay["write_change"][key] for i, lay in enumerate(obo["layers"])}
    bar_plot(path, [f"o={o}" for o in obo["offsets"]], series,
             title=f"{title}: change of {key} at s+o when the input at s changes", ylabel="relative change")


def plot_paths(path: Path, pp: dict[str, Any], title: str, top: int = 12) -> None:
    """The ``top`` path-patching effects (1 = as harmful as the corrupted run)."""
    from lmlab.core.plotting import bar_plot

    items = sorted(pp["paths"].items(), key=lambda kv: -abs(kv[1]))[:top]
    bar_plot(path, [k for k, _ in items], {"effect": [v for _, v in items]},
             title=f"{title}: path patching (second-half loss, normalised)", ylabel="effect")


def main(cfg: CircuitsConfig) -> Path:
    """``lmlab interp circuits MODEL --task induction|off-by-one``."""
    from lmlab.core.models import load
    from lmlab.core.plotting import bar_plot, heatmap
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
        plot_off_by_one(run.plots / "off_by_one.png", res["off_by_one"], cfg.model)
        if "path_patching" in res:
            plot_paths(run.plots / "path_patching.png", res["path_patching"], cfg.model)
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
            # fixed L = 16 keeps the tour quick; with a fixed L a head can also copy by relative position alone,
            # which path patching shows (benchmarks/universality.py varies L to rule that out)
            model = train_induction_model(arch, steps=400 if arch == "dense" else 1500, seed=cfg.seed,
                                          half_range=(16, 16), loop="pretrain" if arch == "dense" else "aligned")
            r = analyze(model, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32, seed=cfg.seed), 64, 0)
            results[arch] = r
            lines.append(f"{arch} on repeated random tokens: loss first half {r['loss_first']:.2f}, repeat "
                         f"{r['loss_second']:.2f} nats (induction gain {r['induction_gain']:.2f}).")
            if "induction_scores" in r:
                heatmap(run.plots / "induction_scores.png", r["induction_scores"], title="induction score per head",
                        xlabel="head", ylabel="layer", vmin=0, vmax=1)
                lines.append(f"  induction heads (score > 0.3, [layer, head]): {r['induction_heads']}")
            pp = r["path_patching"]
            lines.append(f"  path patching (clean [x, x] vs corrupted [x', x]): strongest path "
                         f"{pp['top_path']['path']} (effect {pp['top_path']['effect']:.2f}; 1 = as bad as the "
                         "corrupted run)")
            if "conv_lag_ablation" in r:
                gains = {k: round(v["induction_gain"], 3) for k, v in r["conv_lag_ablation"].items()}
                lines.append(f"  induction gain with conv lag zeroed: {gains}")
            obo = r["off_by_one"]
            lines.append(f"  Off-by-One: the token at s changes the memory key ({obo['key_channel']}) most at s + "
                         f"{obo['key_peak_offset']} (per layer)")
        run.finish(results)
    return run.path, "\n".join(lines)
