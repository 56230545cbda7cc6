"""Model loading: ref:NAME, local folders, clear one-line errors, offline hub names, no remote code by default."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_llama

from lmlab.core import models, zoo
from lmlab.core.models import load, load_model, load_tokenizer, n_params, resolve_model_path
from lmlab.errors import LmlabError


def test_load_ref_dense(ref_zoo, tiny_tok):
    m = load_model("ref:dense")
    assert type(m).__name__ == "LlamaForCausalLM" and not m.training
    assert m.config.hidden_size == 32 and m.config.vocab_size == len(tiny_tok)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    tok = load_tokenizer("ref:dense")
    assert len(tok) == len(tiny_tok) and tok.pad_token is not None
    text = "def f(x):\n    return x + 1\n"
    assert tok(text)["input_ids"] == tiny_tok(text)["input_ids"]
    m2, tok2 = load("ref:mamba", dtype=torch.bfloat16)
    assert type(m2).__name__ == "Mamba2ForCausalLM" and not m2.training
    assert next(m2.parameters()).dtype == torch.bfloat16 and len(tok2) == len(tiny_tok)
    assert resolve_model_path("ref:mamba") == str(ref_zoo / "mamba")


def test_save_pretrained_folder_loads_by_path(tmp_path, monkeypatch):
    ref = make_tiny_llama()
    ref.save_pretrained(tmp_path / "m")
    x = torch.randint(0, 99, (2, 7))
    for spec in (str(tmp_path / "m"), str(tmp_path / "m") + "/"):
        m = load_model(spec)
        assert not m.training
        torch.testing.assert_close(m(input_ids=x).logits, ref(input_ids=x).logits)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./m") == "m"
    assert resolve_model_path("m") == "m"  # an existing relative folder is a path, not a hub name
    torch.testing.assert_close(load_model("./m")(input_ids=x).logits, ref(input_ids=x).logits)


@pytest.mark.parametrize("spec", ["./nope", "/nonexistent/x", "~/no-such-lmlab-model-dir"])
def test_missing_path_is_a_clear_error(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmlabError, match=f"model path not found: {spec}$"):
        load_model(spec)
    with pytest.raises(LmlabError, match="model path not found"):
        load_tokenizer(spec)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(LmlabError, match="not a model folder"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(LmlabError, match="no model given"):
        load_model("")


def test_broken_folder_is_one_line(tmp_path):
    """A config.json that is not a model config: one-line LmlabError naming the folder, no chained traceback."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LmlabError) as e:
        load_model(str(tmp_path / "bad"))
    assert str(tmp_path / "bad") in str(e.value) and "\n" not in str(e.value)
    assert e.value.__suppress_context__


def test_unknown_hub_name_offline_is_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(LmlabError) as e:
        load_model("lmlab-test-org/no-such-model-xyz")
    msg = str(e.value)
    assert "lmlab-test-org/no-such-model-xyz" in msg and "offline" in msg and "\n" not in msg
    assert e.value.__suppress_context__  # raised "from None": the CLI prints just this line
    with pytest.raises(LmlabError) as e:
        load_tokenizer("lmlab-test-org/no-such-model-xyz")
    assert "\n" not in str(e.value)


def test_trust_remote_code_defaults_false():
    for fn in (models.load_model, models.load_tokenizer, models.load, zoo.build_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    from lmlab.core.pretrain import PretrainConfig
    from lmlab.evaluate.perplexity import PerplexityConfig

    assert PretrainConfig().trust_remote_code is False and PerplexityConfig().trust_remote_code is False


def _remote_code_folder(path, marker):
    """A model folder whose config.json maps Auto* classes to custom code that writes ``marker`` on import."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "lmlab_evil",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"},
    }))
    (path / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("custom code ran")
        from transformers import PretrainedConfig
        class EvilConfig(PretrainedConfig):
            model_type = "lmlab_evil"
    """))


def test_remote_code_is_not_executed_by_default(tmp_path):
    marker = tmp_path / "MARKER"
    _remote_code_folder(tmp_path / "evil", marker)
    with pytest.raises(LmlabError, match="cannot load model"):
        load_model(str(tmp_path / "evil"))
    with pytest.raises(LmlabError):
        load_tokenizer(str(tmp_path / "evil"))
    assert not marker.exists()


def test_remote_code_runs_only_when_trusted(tmp_path):
    """Positive control for the test above: with trust_remote_code=True the same folder's code does run
    (in a subprocess with its own HF cache, so nothing is written to the user's)."""
    marker = tmp_path / "MARKER"
    _remote_code_folder(tmp_path / "evil", marker)
    code = ("from lmlab.core.models import load_model\n"
            f"try:\n    load_model({str(tmp_path / 'evil')!r}, trust_remote_code=True)\n"
            "except Exception as e:\n    print(type(e).__name__)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert marker.read_text() == "custom code ran"


def test_n_params_counts_tied_weights_once():
    untied, tied = make_tiny_llama(tie=False), make_tiny_llama(tie=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert n_params(untied) == sum(p.numel() for p in untied.parameters())
    assert n_params(tied) == n_params(untied) - 99 * 32
    tied.get_input_embeddings().weight.requires_grad_(False)
    assert n_params(tied, trainable_only=True) == n_params(tied) - 99 * 32
