"""lmlab.core.hooks on real tiny HF models: residual-stream identities, patching, errors, handle cleanup."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lmlab.core.hooks import ARCHS, capture, hook_names, n_layers, patch, resolve
from lmlab.errors import LmlabError

IDS = torch.tensor([[5, 17, 42, 8, 63, 21], [9, 3, 77, 31, 14, 50]])  # (B=2, T=6)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (B, T, V)


def n_hooks(model) -> int:
    """All forward (pre-)hooks; transformers 5.24 leaves its own on layers after output_hidden_states=True."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def identity(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()  # a new tensor, so the replacement path really runs


def zero(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.zeros_like(x)


# --- Llama ------------------------------------------------------------------------------------------


def test_llama_names_and_layers(tiny_llama):
    names = hook_names(tiny_llama)
    assert n_layers(tiny_llama) == 2
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    for i in range(2):
        for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                  "attn.hook_pattern"):
            assert f"blocks.{i}.{h}" in names
    assert "blocks.2.hook_resid_pre" not in names
    assert {hp.kind for hp in resolve(tiny_llama, "blocks.0.hook_resid_pre")} == {"pre"}


def test_llama_residual_stream_identities(tiny_llama):
    with capture(tiny_llama, ["hook_embed", "blocks.*.hook_*", "ln_final.hook_normalized"]) as a:
        out = tiny_llama(IDS, output_hidden_states=True)
    assert a["blocks.0.hook_resid_post"].shape == (2, 6, 32)
    assert torch.equal(a["blocks.0.hook_resid_pre"], a["hook_embed"])
    assert torch.equal(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"])
    for i in range(2):
        b = f"blocks.{i}."
        torch.testing.assert_close(a[b + "hook_resid_mid"], a[b + "hook_resid_pre"] + a[b + "hook_attn_out"])
        torch.testing.assert_close(a[b + "hook_resid_post"], a[b + "hook_resid_mid"] + a[b + "hook_mlp_out"])
    # Measured with transformers 5.24 (style.md §3.2): hidden_states[0] is the embeddings, [i+1] is layer
    # i's output EXCEPT the last entry, which is model.norm(...). An upgrade that changes this fails here.
    hs = out.hidden_states
    assert len(hs) == 3
    assert torch.equal(hs[0], a["hook_embed"]) and torch.equal(hs[1], a["blocks.0.hook_resid_post"])
    assert torch.equal(hs[2], a["ln_final.hook_normalized"])
    assert not torch.allclose(hs[2], a["blocks.1.hook_resid_post"])


def test_llama_pattern_is_causal_probabilities(tiny_llama):
    with capture(tiny_llama, "blocks.*.attn.hook_pattern") as a:
        tiny_llama(IDS)
    for i in range(2):
        p = a[f"blocks.{i}.attn.hook_pattern"]  # (B, H, Tq, Tk)
        assert p.shape == (2, 4, 6, 6)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 6))
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        assert torch.all(p[..., ~causal] == 0) and torch.all(p[..., causal] > 0)


def test_pattern_needs_eager_attention():
    sdpa = make_tiny_llama(attn="sdpa")
    assert "blocks.0.attn.hook_pattern" not in hook_names(sdpa)
    assert "blocks.0.hook_attn_out" in hook_names(sdpa)
    for name in ("blocks.0.attn.hook_pattern", "blocks.*.attn.hook_pattern"):
        with pytest.raises(LmlabError, match='attn_implementation="eager"'), capture(sdpa, name):
            pass
    assert n_hooks(sdpa) == 0


def test_llama_identity_patch_is_exact_and_zeroing_changes(tiny_llama):
    clean = logits(tiny_llama)
    every = [n for n in hook_names(tiny_llama) if "pattern" not in n and "resid_mid" not in n]
    with patch(tiny_llama, dict.fromkeys(every, identity)):
        assert torch.equal(logits(tiny_llama), clean)
    with patch(tiny_llama, {"blocks.*.hook_*_out": lambda x, n: None}):  # None = unchanged
        assert torch.equal(logits(tiny_llama), clean)
    for name in ("blocks.1.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.1.hook_resid_pre"):
        with patch(tiny_llama, {name: zero}):
            assert not torch.allclose(logits(tiny_llama), clean), name
    assert torch.equal(logits(tiny_llama), clean)  # hooks gone


def test_activation_patching_restores_clean_run(tiny_llama):
    corrupt = IDS.flip(-1)
    with capture(tiny_llama, "blocks.1.hook_resid_pre") as a:
        clean = logits(tiny_llama)
    with patch(tiny_llama, {"blocks.0.hook_resid_post": lambda x, n: a["blocks.1.hook_resid_pre"]}):
        assert torch.equal(logits(tiny_llama, corrupt), clean)
    # Registration order: capture opened inside patch sees the patched input of a pre-hook point.
    with patch(tiny_llama, {"blocks.1.hook_resid_pre": lambda x, n: 2 * x}), \
            capture(tiny_llama, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]) as b:
        tiny_llama(IDS)
    assert torch.equal(b["blocks.1.hook_resid_pre"], 2 * b["blocks.0.hook_resid_post"])


def test_read_only_points_refuse_patching(tiny_llama):
    with pytest.raises(LmlabError, match="hook_attn_out instead"), patch(tiny_llama, {"blocks.0.hook_resid_mid": zero}):
        pass
    with pytest.raises(LmlabError, match="cannot patch blocks.0.attn.hook_pattern"), \
            patch(tiny_llama, {"blocks.0.attn.hook_pattern": zero}):
        pass


def test_handles_removed_after_exception(tiny_llama):
    before = n_hooks(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_llama, "blocks.*.hook_*"):
        assert n_hooks(tiny_llama) == before + 12
        raise RuntimeError("boom")
    assert n_hooks(tiny_llama) == before
    with pytest.raises(RuntimeError, match="boom"), patch(tiny_llama, {"L0R": identity, "L1M": zero}):
        assert n_hooks(tiny_llama) == before + 2
        raise RuntimeError("boom")
    assert n_hooks(tiny_llama) == before

    def bad(x, name):
        raise ValueError("inside the forward")

    with pytest.raises(ValueError, match="inside the forward"), patch(tiny_llama, {"blocks.0.hook_mlp_out": bad}):
        tiny_llama(IDS)
    assert n_hooks(tiny_llama) == before


def test_unknown_name_lists_valid_names(tiny_llama):
    before = n_hooks(tiny_llama)
    with pytest.raises(LmlabError, match=r"unknown hook name 'blocks.7.hook_resid_post'.*blocks\.0\.hook_resid_pre"):
        resolve(tiny_llama, "blocks.7.hook_resid_post")
    with pytest.raises(LmlabError, match="hook_names"), capture(tiny_llama, ["L0R", "model.nope.*"]):
        pass
    assert n_hooks(tiny_llama) == before


def test_llama_scope_aliases_wildcards_raw_paths(tiny_llama):
    names = ["L0R", "L1A", "L1M", "blocks.*.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
             "model.layers.0.mlp", "model.layers.*.self_attn", "model.norm"]
    with capture(tiny_llama, names) as a:
        tiny_llama(IDS)
    assert set(a) == {"L0R", "L1A", "L1M", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                      "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "model.layers.0.mlp",
                      "model.layers.0.self_attn", "model.layers.1.self_attn", "model.norm"}
    assert torch.equal(a["L0R"], a["blocks.0.hook_resid_post"])
    assert torch.equal(a["L1A"], a["blocks.1.hook_attn_out"])
    assert torch.equal(a["L1M"], a["blocks.1.hook_mlp_out"])
    assert torch.equal(a["model.layers.1.self_attn"], a["blocks.1.hook_attn_out"])  # tuple output -> [0]
    with capture(tiny_llama, "blocks.0.hook_mlp_out") as b:
        tiny_llama(IDS)
    assert torch.equal(a["model.layers.0.mlp"], b["blocks.0.hook_mlp_out"])
    with patch(tiny_llama, {"model.layers.*.mlp": zero}):
        raw = logits(tiny_llama)
    with patch(tiny_llama, {"blocks.*.hook_mlp_out": zero}):
        assert torch.equal(logits(tiny_llama), raw)


def test_capture_options(tiny_llama):
    with capture(tiny_llama, "L0R") as last, capture(tiny_llama, "L0R", accumulate=True) as every:
        tiny_llama(IDS[:1])
        tiny_llama(IDS[1:])
    assert len(every["L0R"]) == 2 and torch.equal(last["L0R"], every["L0R"][1])
    assert not last["L0R"].requires_grad  # detach=True by default
    assert not torch.equal(every["L0R"][0], every["L0R"][1])
    with capture(tiny_llama, "L0R", dtype=torch.float16, to_cpu=True) as half, \
            capture(tiny_llama, "L0R", detach=False) as live:
        tiny_llama(IDS)
    assert half["L0R"].dtype == torch.float16 and half["L0R"].device.type == "cpu"
    assert live["L0R"].requires_grad and live["L0R"].grad_fn is not None
    live["L0R"].sum().backward()
    assert tiny_llama.model.embed_tokens.weight.grad is not None
    tiny_llama.zero_grad(set_to_none=True)


def test_generic_fallback_for_unknown_model_type(tiny_llama, monkeypatch, caplog):
    with capture(tiny_llama, ["blocks.1.hook_mlp_out", "hook_embed"]) as ref:
        tiny_llama(IDS)
    monkeypatch.setattr(tiny_llama.config, "model_type", "mystery")
    assert "mystery" not in ARCHS
    names = hook_names(tiny_llama)
    assert "blocks.1.hook_mlp_out" in names and "blocks.0.hook_resid_mid" not in names  # no mid guess
    with capture(tiny_llama, ["blocks.1.hook_mlp_out", "hook_embed"]) as a:
        tiny_llama(IDS)
    assert all(torch.equal(a[k], ref[k]) for k in ref)
    assert "no hook table entry for model_type 'mystery'" in caplog.text


# --- Mamba ------------------------------------------------------------------------------------------


def test_mamba_residual_stream_and_hidden_states_fact(tiny_mamba):
    assert "blocks.0.hook_mixer_out" in hook_names(tiny_mamba)
    assert not any("resid_mid" in n or "attn" in n for n in hook_names(tiny_mamba))
    with capture(tiny_mamba, ["hook_embed", "blocks.*.hook_*", "ln_final.hook_normalized"]) as a:
        out = tiny_mamba(IDS, output_hidden_states=True)
    assert torch.equal(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"])
    assert torch.equal(a["blocks.0.hook_resid_pre"], a["hook_embed"])
    for i in range(2):
        b = f"blocks.{i}."
        torch.testing.assert_close(a[b + "hook_resid_post"], a[b + "hook_resid_pre"] + a[b + "hook_mixer_out"])
    # Measured with transformers 5.24 (style.md §3.2): Mamba's hidden_states has NO embeddings entry:
    # [0] is already layer 0's output, [1] layer 1's, and the last is norm_f(...). If an upgrade adds the
    # embeddings entry, this fails loudly; hook_embed stays correct either way.
    hs = out.hidden_states
    assert len(hs) == 3
    assert not torch.allclose(hs[0], a["hook_embed"])
    assert torch.equal(hs[0], a["blocks.0.hook_resid_post"]) and torch.equal(hs[1], a["blocks.1.hook_resid_post"])
    assert torch.equal(hs[2], a["ln_final.hook_normalized"])


def test_mamba_identity_patch_and_errors(tiny_mamba):
    before, clean = n_hooks(tiny_mamba), logits(tiny_mamba)
    with patch(tiny_mamba, {"hook_embed": identity, "blocks.*.hook_*": identity}):
        assert torch.equal(logits(tiny_mamba), clean)
    with patch(tiny_mamba, {"blocks.0.hook_mixer_out": zero}):
        assert not torch.allclose(logits(tiny_mamba), clean)
    with pytest.raises(LmlabError, match="unknown hook name 'blocks.0.hook_resid_mid'"):
        resolve(tiny_mamba, "blocks.0.hook_resid_mid")
    assert n_hooks(tiny_mamba) == before


# --- GPT-2 and GPT-NeoX -----------------------------------------------------------------------------


def test_gpt2_residual_stream_and_identity_patch(tiny_gpt2):
    with capture(tiny_gpt2, ["hook_embed", "hook_pos_embed", "blocks.*.hook_*"]) as a:
        clean = tiny_gpt2(IDS).logits
    assert torch.equal(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(a["blocks.0.hook_resid_pre"], a["hook_embed"] + a["hook_pos_embed"])
    for i in range(2):
        b = f"blocks.{i}."
        torch.testing.assert_close(a[b + "hook_resid_mid"], a[b + "hook_resid_pre"] + a[b + "hook_attn_out"])
        torch.testing.assert_close(a[b + "hook_resid_post"], a[b + "hook_resid_mid"] + a[b + "hook_mlp_out"])
    torch.testing.assert_close(a["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(2, 4, 6))
    with patch(tiny_gpt2, {"blocks.*.hook_*_out": identity, "blocks.*.hook_resid_p*": identity}):
        assert torch.equal(logits(tiny_gpt2), clean.detach())


def test_neox_parallel_residual(tiny_neox):
    assert tiny_neox.config.use_parallel_residual
    with capture(tiny_neox, "blocks.*.hook_*") as a:
        clean = logits(tiny_neox)
    assert torch.equal(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"])
    for i in range(2):
        b = f"blocks.{i}."
        torch.testing.assert_close(a[b + "hook_resid_post"],
                                   a[b + "hook_resid_pre"] + a[b + "hook_attn_out"] + a[b + "hook_mlp_out"])
    assert "blocks.0.hook_resid_mid" not in hook_names(tiny_neox)
    with pytest.raises(LmlabError, match="use_parallel_residual=True has no resid_mid"):
        resolve(tiny_neox, "blocks.0.hook_resid_mid")
    with patch(tiny_neox, {"blocks.*.hook_*_out": identity, "blocks.*.hook_resid_p*": identity}):
        assert torch.equal(logits(tiny_neox), clean)
