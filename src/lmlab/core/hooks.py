"""Hook points: TransformerLens-style names resolved to raw Hugging Face modules.

lmlab never re-implements a model to read its activations (DESIGN.md principle 5). ``ARCHS`` (a plain dict,
one entry per HF ``model_type``; extend it for new models) maps each canonical name to a module of the
loaded model and a kind: ``"pre"`` (a forward pre-hook reads the module's first input) or ``"post"`` (a
forward hook reads its output, element ``index`` when the output is a tuple).

    hook_embed, hook_pos_embed (gpt2)   token / position embedding output               (B, T, d)
    blocks.{i}.hook_resid_pre           input of layer i                                (B, T, d)
    blocks.{i}.attn.hook_pattern        attention probabilities (eager attention only)  (B, H, Tq, Tk)
    blocks.{i}.hook_attn_out            attention module output                         (B, T, d)
    blocks.{i}.hook_resid_mid           input of the post-attention norm = resid_pre + attn_out (B, T, d);
                                        none for Mamba nor for parallel-residual GPT-NeoX
    blocks.{i}.hook_mlp_out             MLP module output                               (B, T, d)
    blocks.{i}.hook_mixer_out           Mamba mixer output                              (B, T, d)
    blocks.{i}.hook_resid_post          output of layer i (= resid_pre of layer i + 1)  (B, T, d)
    ln_final.hook_normalized            final norm output                               (B, T, d)

Llama Scope positions are aliases: ``L{i}R`` / ``L{i}A`` / ``L{i}M`` = resid_post / attn_out / mlp_out.
fnmatch wildcards (``blocks.*.hook_resid_post``) expand over canonical names; any other name is a raw
module path or glob over ``model.named_modules()`` (``model.layers.*.mlp``; ``*`` also matches dots),
hooked on its output. hook_pattern and hook_resid_mid can be captured, not patched (see ``_RO``).
Do not index ``output_hidden_states`` across architectures instead: in transformers 5.24 Mamba's entry 0
is already layer 0's output and Llama's last entry is post-norm (tests pin both).
Hooks run in registration order, so ``with patch(...): with capture(...)`` captures patched values.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

_LLAMA = {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp", "mid": "post_attention_layernorm",
          "embed": "model.embed_tokens", "final_norm": "model.norm"}
_MAMBA = {"layers": "backbone.layers", "mixer": "mixer", "embed": "backbone.embeddings",
          "final_norm": "backbone.norm_f"}
# model_type -> paths. layers/embed/pos_embed/final_norm: from the model root (a base model, lacking the
# first component, works too); attn/mlp/mixer/mid (the norm whose input is resid_mid): attributes of a
# layer; no_mid_if: a config flag that removes resid_mid. A missing key means the hook does not exist.
ARCHS: dict[str, dict[str, str]] = {
    "llama": dict(_LLAMA), "mistral": dict(_LLAMA), "qwen2": dict(_LLAMA), "qwen3": dict(_LLAMA),
    "lmlab_moe": dict(_LLAMA),
    "gpt2": {"layers": "transformer.h", "attn": "attn", "mlp": "mlp", "mid": "ln_2",
             "embed": "transformer.wte", "pos_embed": "transformer.wpe", "final_norm": "transformer.ln_f"},
    "gpt_neox": {"layers": "gpt_neox.layers", "attn": "attention", "mlp": "mlp",
                 "mid": "post_attention_layernorm", "no_mid_if": "use_parallel_residual",
                 "embed": "gpt_neox.embed_in", "final_norm": "gpt_neox.final_layer_norm"},
    "mamba": dict(_MAMBA), "mamba2": dict(_MAMBA),
}
_GUESS = {"attn": ("self_attn", "attn", "attention", "self_attention"), "mlp": ("mlp", "feed_forward", "ffn"),
          "mixer": ("mixer",)}  # generic fallback; no "mid" guess (sandwich norms would make it wrong)
_ALIASES = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}
_RO = {"mid": "the layer keeps its own copy of the residual, so this would change only the MLP input; patch "
              "blocks.{i}.hook_attn_out instead (resid_mid = resid_pre + attn_out)",
       "pattern": "HF attention returns its weights after using them, so a replacement would change nothing"}

PatchFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]  # fn(activation, name) -> replacement | None
_HookFn = Callable[["HookPoint", torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: ``name`` as requested, the HF ``module`` at ``path``, and how to read it."""

    name: str
    module: nn.Module
    path: str
    kind: Literal["pre", "post"] = "post"
    index: int = 0  # element of a tuple output (1 = attn_weights of an HF attention module)
    read_only: str = ""  # why patch() refuses this point ("" = patchable)

    def extract(self, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        if self.kind == "pre":
            x = args[0] if args else kwargs.get("hidden_states")
        else:  # HF layers return a tensor or a tuple, depending on module and version
            x = output if isinstance(output, torch.Tensor) else output[self.index]
        if not isinstance(x, torch.Tensor):
            raise LmlabError(f"{self.name}: {self.path} gave {type(x).__name__}, not a tensor")
        return x

    def insert(self, args: tuple, kwargs: dict, output: Any, new: torch.Tensor) -> Any:
        """The hook's return value that makes the module see (pre) or return (post) ``new``."""
        if self.kind == "pre":
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        if isinstance(output, torch.Tensor):
            return new
        if isinstance(output, (tuple, list)):
            return type(output)([new if j == self.index else o for j, o in enumerate(output)])
        output[list(output.keys())[self.index]] = new  # a ModelOutput
        return output


def _sub(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    for p in (path, path.split(".", 1)[-1]):  # "model.layers" also finds a base model's "layers"
        try:
            return p, model.get_submodule(p)
        except AttributeError:
            continue
    raise LmlabError(f"{type(model).__name__} has no module {path!r}; fix lmlab.core.hooks.ARCHS")


def _arch(model: nn.Module) -> dict[str, str]:
    """The ARCHS entry of ``model``, or one guessed from its first ModuleList of layers."""
    mt = getattr(model.config, "model_type", "")
    if mt in ARCHS:
        return ARCHS[mt]
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise LmlabError(f"model_type {mt!r}: no layer list found; add an entry to lmlab.core.hooks.ARCHS")
    n = getattr(model.config, "num_hidden_layers", None)
    path, layers = next(((p, m) for p, m in lists if len(m) == n), lists[0])
    spec = {"layers": path}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    found = {key: [c for c in cands if isinstance(getattr(layers[0], c, None), nn.Module)]
             for key, cands in _GUESS.items()} | {"embed": [p for p, m in model.named_modules() if m is emb]}
    spec.update({key: hits[0] for key, hits in found.items() if hits})
    log.warning("no hook table entry for model_type %r; guessed %s", mt, spec)
    return spec


def _has_mid(model: nn.Module, spec: dict[str, str]) -> bool:
    flag = spec.get("no_mid_if")
    return "mid" in spec and not (flag and getattr(model.config, flag, False))


def _is_eager(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "eager"


def _canonical(model: nn.Module, spec: dict[str, str]) -> dict[str, HookPoint]:
    """Every canonical hook name of ``model`` -> its HookPoint, in forward order."""
    lpath, layers = _sub(model, spec["layers"])
    out: dict[str, HookPoint] = {}

    def add(name: str, path: str, kind: Literal["pre", "post"] = "post", index: int = 0, ro: str = "") -> None:
        out[name] = HookPoint(name, model.get_submodule(path), path, kind, index, ro)

    for key, name in (("embed", "hook_embed"), ("pos_embed", "hook_pos_embed")):
        if key in spec:
            add(name, _sub(model, spec[key])[0])
    for i in range(len(layers)):
        b, lp = f"blocks.{i}.", f"{lpath}.{i}"
        add(b + "hook_resid_pre", lp, "pre")
        if "attn" in spec and _is_eager(model):
            add(b + "attn.hook_pattern", f"{lp}.{spec['attn']}", index=1, ro=_RO["pattern"])
        if "attn" in spec:
            add(b + "hook_attn_out", f"{lp}.{spec['attn']}")
        if _has_mid(model, spec):
            add(b + "hook_resid_mid", f"{lp}.{spec['mid']}", "pre", ro=_RO["mid"].format(i=i))
        for key, hook in (("mlp", "hook_mlp_out"), ("mixer", "hook_mixer_out")):
            if key in spec:
                add(b + hook, f"{lp}.{spec[key]}")
        add(b + "hook_resid_post", lp)
    if "final_norm" in spec:
        add("ln_final.hook_normalized", _sub(model, spec["final_norm"])[0])
    return out


def hook_names(model: nn.Module) -> list[str]:
    """All canonical hook names available on ``model`` (hook_pattern only under eager attention)."""
    return list(_canonical(model, _arch(model)))


def n_layers(model: nn.Module) -> int:
    return len(_sub(model, _arch(model)["layers"])[1])


def _unknown(model: nn.Module, spec: dict[str, str], key: str, table: dict[str, HookPoint]) -> LmlabError:
    mt, impl = getattr(model.config, "model_type", "?"), getattr(model.config, "_attn_implementation", None)
    if "hook_pattern" in key and "attn" in spec and not _is_eager(model):
        return LmlabError(f"{key} needs attention weights, which {impl!r} attention does not return; "
                          'load the model with attn_implementation="eager"')
    if "hook_resid_mid" in key and "mid" in spec and not _has_mid(model, spec):
        return LmlabError(f"{key}: {mt} with {spec['no_mid_if']}=True has no resid_mid (attention and MLP "
                          "both read resid_pre; resid_post = resid_pre + attn_out + mlp_out)")
    return LmlabError(f"unknown hook name {key!r} for model_type {mt!r}; valid names include "
                      f"{', '.join(list(table)[:9])}, ... ({len(table)} in all, see hook_names(model)), "
                      "Llama Scope aliases like L0R, and raw module paths or globs from model.named_modules()")


def resolve(model: nn.Module, names: str | Iterable[str]) -> list[HookPoint]:
    """Canonical names, aliases, wildcards, raw module paths or globs -> HookPoints (unknown: LmlabError)."""
    spec = _arch(model)
    table, modules = _canonical(model, spec), dict(model.named_modules())
    points: list[HookPoint] = []
    for name in [names] if isinstance(names, str) else names:
        alias = re.fullmatch(r"L(\d+)([RAM])", name)
        key = f"blocks.{alias[1]}.{_ALIASES[alias[2]]}" if alias else name
        if key in table:
            points.append(replace(table[key], name=name))
            continue
        hits = [table[k] for k in table if fnmatch.fnmatchcase(k, key)]
        hits = hits or [HookPoint(p, m, p) for p, m in modules.items() if p and fnmatch.fnmatchcase(p, key)]
        if not hits:
            raise _unknown(model, spec, key, table)
        points += hits
    return points


@contextmanager
def _hooked(pairs: list[tuple[HookPoint, _HookFn]]) -> Iterator[None]:
    """Register each ``fn(point, tensor) -> replacement | None`` on its point; always remove the handles."""
    handles: list[RemovableHandle] = []

    def make(hp: HookPoint, fn: _HookFn) -> RemovableHandle:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any = None) -> Any:
            new = fn(hp, hp.extract(args, kwargs, output))
            return None if new is None else hp.insert(args, kwargs, output, new)

        if hp.kind == "pre":  # hook(module, args, kwargs) -> (args, kwargs) | None
            return hp.module.register_forward_pre_hook(hook, with_kwargs=True)
        return hp.module.register_forward_hook(hook, with_kwargs=True)  # hook(..., output) -> output | None

    try:
        for hp, fn in pairs:
            handles.append(make(hp, fn))
            log.debug("hooked %s -> %s (%s)", hp.name, hp.path, hp.kind)
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: nn.Module, names: str | Iterable[str], *, detach: bool = True, to_cpu: bool = False,
            dtype: torch.dtype | None = None, accumulate: bool = False) -> Iterator[dict[str, Any]]:
    """Yield a dict filled on each forward: name -> tensor (B, T, d), or (B, H, Tq, Tk) for hook_pattern.

    Several forwards inside the block: the last one wins, or with ``accumulate=True`` each name maps to a
    list with one tensor per forward. ``to_cpu``/``dtype`` convert on the fly (saves accelerator memory).
    """
    acts: dict[str, Any] = {}

    def store(hp: HookPoint, x: torch.Tensor) -> None:
        x = x.detach() if detach else x
        if to_cpu or dtype is not None:
            x = x.to("cpu" if to_cpu else x.device, dtype or x.dtype)
        if accumulate:
            acts.setdefault(hp.name, []).append(x)
        else:
            acts[hp.name] = x

    with _hooked([(hp, store) for hp in resolve(model, names)]):
        yield acts


@contextmanager
def patch(model: nn.Module, fns: Mapping[str, PatchFn]) -> Iterator[None]:
    """Replace activations: ``fn(tensor, name)`` returns the new tensor, or None to leave it unchanged."""
    pairs: list[tuple[HookPoint, _HookFn]] = []
    for key, fn in fns.items():
        for hp in resolve(model, key):
            if hp.read_only:
                raise LmlabError(f"cannot patch {hp.name}: {hp.read_only}")
            pairs.append((hp, lambda hp, x, fn=fn: fn(x, hp.name)))
    with _hooked(pairs):
        yield
