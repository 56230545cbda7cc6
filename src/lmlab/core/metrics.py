"""Evaluation maths: language-model likelihood, accuracy, correlations and bootstrap confidence intervals.

Language-model metrics (natural-log NLL throughout)
---------------------------------------------------
For a token stream ``x_0 .. x_{N-1}`` the model scores every *predicted* token ``x_1 .. x_{N-1}``::

    nll_t = -log p(x_t | x_{<t} within the window)          # nats, fp32 log-softmax
    loss  = mean_t nll_t                                     # cross-entropy per token
    ppl   = exp(loss)                                        # perplexity
    bpt   = loss / ln 2                                      # bits per token
    bpb   = sum_t nll_t / (ln 2 * n_bytes)                   # bits per UTF-8 byte of the text

Bits per byte is tokenizer-independent, so it compares models with different vocabularies; ``n_bytes`` is the
UTF-8 length of the text that the scored tokens encode (the caller knows it; :func:`lm_eval_stream` takes it).

Windowing convention (:func:`token_nll`)
----------------------------------------
The model sees at most ``window`` tokens at a time; ``stride`` is the number of *new* tokens a window scores:

* The first window is ``x[0:window]`` and scores ``x_1 .. x_{window-1}``.
* Every later window ends ``stride`` tokens further on, is exactly ``window`` tokens long and scores only its
  last ``stride`` tokens, so each of them is predicted from at least ``window - stride`` tokens of context
  (the sliding-window evaluation of the Hugging Face perplexity guide).
* ``stride=None`` (default) means *non-overlapping*: ``stride = window - 1``; consecutive windows share
  exactly one token (the last input of a window is the first input of the next, as in lm-eval-harness'
  rolling windows), so no token is scored twice and none is skipped. ``stride >= window - 1`` means the same.

Every token ``x_1 .. x_{N-1}`` is scored exactly once whatever the stride; a smaller stride buys more context
per token (lower, more faithful NLL) for more compute. ``x_0`` has no context and is not scored; prepend a BOS
token (``lm_eval_stream(..., bos_id=...)``) to score it too.

Statistics
----------
* :func:`bootstrap_ci`: percentile bootstrap, ``(stat(x), q_{alpha/2}, q_{1-alpha/2})`` of ``stat`` over ``n``
  resamples with replacement; :func:`bootstrap_diff_ci` resamples *paired* items (same indices for ``a`` and
  ``b``) and bounds ``stat(a) - stat(b)``.
* :func:`mean_ci`: Student-t interval ``mean +- t_{1-alpha/2, m-1} * s / sqrt(m)``.
* :func:`pearson`, :func:`spearman`: ``scipy.stats`` correlation coefficients.

torch is imported lazily (only :func:`token_nll` / :func:`lm_eval_stream` need it), so the statistics are
cheap to import from anywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LN2 = math.log(2.0)

__all__ = [
    "token_nll",
    "perplexity",
    "bits_per_byte",
    "bits_per_token",
    "lm_eval_stream",
    "accuracy",
    "bootstrap_ci",
    "bootstrap_diff_ci",
    "mean_ci",
    "pearson",
    "spearman",
]


# ----------------------------------------------------------------------------------------------------------
# language-model likelihood


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window over ``n`` tokens (each scores its last ``n_scored``)."""
    if n < 2:
        return []
    end = min(window, n)
    out = [(0, end, end - 1)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((max(0, new_end - window), new_end, new_end - end))
        end = new_end
    return out


def _as_long_1d(ids: Any) -> torch.Tensor:
    import torch

    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
    else:
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iub":
            raise ValueError(f"ids must be integer token ids, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64))
    if t.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"ids must be integer token ids, got dtype {t.dtype}")
    return t.long()


def _model_device(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def token_nll(
    model: Any,
    ids: Any,
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    device: Any = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) of every predicted token of a long token stream.

    Args:
        model: any causal LM called as ``model(input_ids=x).logits`` with logits ``(B, T, V)``.
        ids: 1-D token ids ``(N,)`` (LongTensor, numpy array or list).
        window: tokens the model sees at once (at most its context length).
        stride: new tokens scored per window (see the module docstring); ``None`` = non-overlapping.
        batch_size: windows per forward pass.
        device: where to run; default the model's device (the model is not moved: pass a matching device).
        progress: show a tqdm bar over batches.

    Returns:
        float32 CPU tensor ``(N-1,)``: entry ``i`` is ``-log p(ids[i+1] | context)``; each token scored once.
    """
    import torch
    import torch.nn.functional as F

    x = _as_long_1d(ids)
    if window < 2:
        raise ValueError(f"window must be >= 2 (one context + one predicted token), got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and window > max_pos and x.numel() > max_pos:
        raise ValueError(f"window {window} exceeds the model's max_position_embeddings {max_pos}")
    step = window - 1 if stride is None else min(int(stride), window - 1)
    if step < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = x.numel()
    spans = _windows(n, window, step)
    out = torch.empty(max(n - 1, 0), dtype=torch.float32)
    if not spans:
        return out
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="nll", unit="batch", disable=None, leave=False)  # a bar on terminals only
    pos = 0  # next target index (into ``out``) to fill; windows score targets in order
    try:
        with torch.no_grad():
            for batch in it:
                # All windows but possibly the first-and-only one are exactly ``window`` long, so a batch is
                # rectangular: every window in it has the same length.
                inp = torch.stack([x[b:e] for b, e, _ in batch]).to(dev)  # (B, T)
                logits = model(input_ids=inp).logits  # (B, T, V)
                for row, (_b, e, k) in enumerate(batch):
                    t = e - _b
                    pred = logits[row, t - 1 - k : t - 1].float()  # (k, V): positions predicting the last k
                    tgt = inp[row, t - k : t]  # (k,)
                    nll = F.cross_entropy(pred, tgt, reduction="none")  # fp32 log-softmax inside
                    out[pos : pos + k] = nll.cpu()
                    pos += k
    finally:
        if was_training:
            model.train()
    assert pos == n - 1, (pos, n)
    return out


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def perplexity(nll: Any) -> float:
    """``exp(mean(nll))`` of per-token NLLs in nats (a scalar is taken as the mean NLL)."""
    v = _to_numpy(nll)
    if v.size == 0:
        raise ValueError("perplexity of no tokens")
    return float(math.exp(float(v.mean())))


def bits_per_token(nll: Any) -> float:
    """``mean(nll) / ln 2`` of per-token NLLs in nats (a scalar is taken as the mean NLL)."""
    v = _to_numpy(nll)
    if v.size == 0:
        raise ValueError("bits per token of no tokens")
    return float(v.mean() / LN2)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """``total_nll_nats / (ln 2 * n_bytes)``: bits per UTF-8 byte of the scored text."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return float(total_nll_nats) / (LN2 * n_bytes)


def lm_eval_stream(
    model: Any,
    ids: Any,
    n_bytes: int,
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    device: Any = None,
    progress: bool = False,
    bos_id: int | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and bits-per-byte of ``model`` on one token stream.

    ``n_bytes`` is the UTF-8 byte length of the text ``ids`` encode. Without ``bos_id`` the first token is
    only context (not scored) while its bytes still count, a negligible bias for long streams; with ``bos_id``
    it is prepended so every token of the text is scored.

    Returns ``{"loss", "ppl", "bpb", "tokens", "bytes", "window", "stride"}``: ``tokens`` is the number of
    scored tokens, ``stride`` the effective stride.
    """
    import torch

    x = _as_long_1d(ids)
    if bos_id is not None:
        x = torch.cat([torch.tensor([int(bos_id)], dtype=torch.long), x])
    nll = token_nll(model, x, window=window, stride=stride, batch_size=batch_size, device=device,
                    progress=progress)
    if nll.numel() == 0:
        raise ValueError("need at least 2 tokens (or 1 with bos_id) to evaluate")
    total = float(nll.double().sum())
    loss = total / nll.numel()
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": bits_per_byte(total, n_bytes),
        "tokens": int(nll.numel()),
        "bytes": int(n_bytes),
        "window": int(window),
        "stride": int(window - 1 if stride is None else min(int(stride), window - 1)),
    }


# ----------------------------------------------------------------------------------------------------------
# accuracy and correlations


def accuracy(pred: Any, target: Any) -> float:
    """Fraction of positions where ``pred == target`` (sequences, arrays or tensors of equal length)."""
    p = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred, dtype=object).reshape(-1)
    t = np.asarray(target.detach().cpu() if hasattr(target, "detach") else target, dtype=object).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.size} vs {t.size}")
    if p.size == 0:
        raise ValueError("accuracy of no items")
    return float(np.mean([a == b for a, b in zip(p.tolist(), t.tolist())]))


def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _to_numpy(x), _to_numpy(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.size} vs {b.size}")
    if a.size < 2:
        raise ValueError("a correlation needs at least 2 points")
    return a, b


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation coefficient (``scipy.stats.pearsonr``); nan when an input is constant."""
    from scipy import stats

    a, b = _pair(x, y)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties); nan if constant."""
    from scipy import stats

    a, b = _pair(x, y)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------------------
# confidence intervals


def _resampled_stats(arrays: Sequence[np.ndarray], stat: Callable[..., Any], n: int, seed: int,
                     combine: Callable[[list[np.ndarray]], np.ndarray]) -> np.ndarray:
    """``combine([stat(a[idx]) for a in arrays])`` over ``n`` shared resamples ``idx`` (chunked)."""
    m = arrays[0].size
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n, 4_000_000 // max(m, 1)))
    out: list[np.ndarray] = []
    vectorised = True
    for start in range(0, n, chunk):
        idx = rng.integers(0, m, size=(min(chunk, n - start), m))  # (c, m)
        per: list[np.ndarray] = []
        for a in arrays:
            sample = a[idx]  # (c, m)
            vals: Any = None
            if vectorised:
                try:
                    vals = np.asarray(stat(sample, axis=1), dtype=np.float64)
                    if vals.shape != (sample.shape[0],):
                        vals = None
                except TypeError:
                    vals = None
                vectorised = vals is not None
            if vals is None:
                vals = np.array([float(stat(row)) for row in sample])
            per.append(vals)
        out.append(combine(per))
    return np.concatenate(out)


def _check_ci_args(n: int, alpha: float) -> None:
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_ci(values: Any, stat: Callable[..., Any] = np.mean, n: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap ``(stat(values), lo, hi)`` at confidence ``1 - alpha`` (``n`` resamples)."""
    _check_ci_args(n, alpha)
    v = _to_numpy(values)
    if v.size == 0:
        raise ValueError("bootstrap of no values")
    point = float(stat(v))
    boots = _resampled_stats([v], stat, n, seed, lambda per: per[0])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def bootstrap_diff_ci(a: Any, b: Any, stat: Callable[..., Any] = np.mean, n: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> tuple[float, float, float]:
    """Paired percentile bootstrap of ``stat(a) - stat(b)``: items are resampled jointly (same indices)."""
    _check_ci_args(n, alpha)
    x, y = _to_numpy(a), _to_numpy(b)
    if x.shape != y.shape:
        raise ValueError(f"paired bootstrap needs equal lengths: {x.size} vs {y.size}")
    if x.size == 0:
        raise ValueError("bootstrap of no values")
    point = float(stat(x)) - float(stat(y))
    boots = _resampled_stats([x, y], stat, n, seed, lambda per: per[0] - per[1])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def mean_ci(values: Any, alpha: float = 0.05) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: Student-t interval of the mean; lo/hi are nan for fewer than 2 values."""
    from scipy import stats

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = _to_numpy(values)
    if v.size == 0:
        raise ValueError("mean of no values")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half
