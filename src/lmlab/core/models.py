"""Model and tokenizer loading: a Hugging Face name, a local directory, or a reference name ``ref:NAME``.

* ``ref:dense`` / ``ref:mamba`` (and later ``ref:moe``) resolve through :mod:`lmlab.core.zoo`: a model the
  user retrained in the cache dir wins over the one shipped with the package.
* A local path must exist and hold a ``config.json`` (a HF ``save_pretrained`` folder).
* Anything else is a hub name, loaded with ``from_pretrained``; with ``HF_HUB_OFFLINE=1`` (or no network) it must
  already be in the local HF cache, else a one-line :class:`~lmlab.errors.LmlabError` says so.
* ``trust_remote_code`` is only ever the caller's explicit choice (default False).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def resolve_model_path(spec: str) -> str:
    """Turn ``ref:NAME`` or a path into a local directory; hub names are returned unchanged."""
    if not spec:
        raise LmlabError("no model given")
    if spec.startswith("ref:"):
        from lmlab.core import zoo

        return str(zoo.resolve(spec[4:]))
    if _looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.exists():
            raise LmlabError(f"model path not found: {spec}")
        if p.is_dir() and not (p / "config.json").is_file():
            raise LmlabError(f"{spec} is not a model folder (no config.json)")
        return str(p)
    return spec


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None, **kw: Any):
    """Load a causal LM in eval mode. ``attn_implementation="eager"`` is needed for attention-pattern hooks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(spec)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and '"lmlab_moe"' in cfg_file.read_text():
        from lmlab.train.moe import register

        register()  # lmlab's own model_type "lmlab_moe" for the Auto classes (imported only when needed)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(path).exists():
            raise LmlabError(f"cannot load model from {path}: {first}") from None
        raise LmlabError(f"cannot load model {spec!r}: not a local folder, and not in the local Hugging Face "
                         f"cache while offline ({first})") from None
    return model.to(device).eval()


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Load the tokenizer stored with a model (or a tokenizer folder)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmlabError(f"cannot load tokenizer {spec!r}: {first}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False, attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a model spec."""
    model = load_model(spec, device, dtype, trust_remote_code, attn_implementation)
    tok = load_tokenizer(spec, trust_remote_code)
    return model, tok


def n_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
