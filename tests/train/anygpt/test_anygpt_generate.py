"""Constrained generation (ModalityGrammar) with a real random tiny Llama, and the CLI mains end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lmlab.config import ConfigError
from lmlab.train.anygpt import data as D
from lmlab.train.anygpt import model as M


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.core.tokenizer import train_bpe

    tok = train_bpe(D.bpe_texts(0), vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                                         max_position_embeddings=512, pad_token_id=1)).eval()
    vm = D.expand_vocab(tok, model, {"image": 64, "speech": 64})
    # bias the random model towards markers and the wrong modality, so the grammar has work to do
    with torch.no_grad():
        model.lm_head.weight[vm.text_vocab:] *= 5
    return model, tok, vm


PROMPTS = [D.stage1_prompt("text->image", D.caption(d), "Draw the digit.") for d in range(6)]


@pytest.mark.parametrize("modality", ["image", "speech"])
def test_constrained_spans_stay_in_modality(lm, modality):
    model, tok, vm = lm
    prompts = PROMPTS if modality == "image" else [p.replace("Draw the digit.", "Say this aloud.") for p in PROMPTS]
    gens = M.generate(model, tok, vm, prompts, modality, max_new_tokens=40, sample=True, temperature=2.0,
                      max_span=20)
    codes = set(vm.code_ids(modality))
    m = vm.modalities[modality]
    prefix = M.answer_prefix(tok, vm, prompts[0], modality)
    assert prefix and D.encode(tok, " ")[-1:] == prefix[-1:]  # the space token seen in training
    for g in gens:
        assert g[: len(prefix)] == prefix and g[len(prefix)] == m["start"]
        end = g.index(m["end"])
        inside = g[len(prefix) + 1: end]
        assert inside and all(t in codes for t in inside)
        assert len(inside) == 4 if modality == "image" else 1 <= len(inside) <= 20
        assert g[end + 1:] == []  # stopped at <eoa>
        assert M.parse_span(g, vm, modality) == [t - m["offset"] for t in inside]


def test_unconstrained_leaks_and_text_constraint(lm):
    model, tok, vm = lm
    special = set(vm.special_ids()) - {vm.roles[D.EOA]}
    free = M.generate(model, tok, vm, PROMPTS, "image", max_new_tokens=12, sample=True, temperature=2.0,
                      constrain=False)
    assert any(t in special for g in free for t in g)  # the random model does emit modality tokens ...
    text = M.generate(model, tok, vm, PROMPTS, "text", max_new_tokens=12, sample=True, temperature=2.0)
    assert all(t not in special for g in text for t in g)  # ... which the text grammar forbids


def test_grammar_states(lm):
    _, _, vm = lm
    g = M.ModalityGrammar(vm, "image", prompt_len=0, prefix=[7], min_span=4, max_span=4)
    m = vm.modalities["image"]
    assert g.allowed([]).tolist() == [7]
    assert g.allowed([7]).tolist() == [m["start"]]
    assert set(g.allowed([7, m["start"], m["offset"]]).tolist()) == set(vm.code_ids("image"))
    assert g.allowed([7, m["start"]] + [m["offset"]] * 4).tolist() == [m["end"]]
    assert g.allowed([7, m["start"]] + [m["offset"]] * 4 + [m["end"]]).tolist() == [vm.roles[D.EOA]]


def test_generate_config_errors():
    with pytest.raises(ConfigError, match="output_modality"):
        M.GenerateConfig(model="x", input="y", output_modality="video")
    with pytest.raises(ConfigError, match="model is required"):
        M.generate_main(M.GenerateConfig(input="y"))
    with pytest.raises(ConfigError, match="input is required"):
        M.generate_main(M.GenerateConfig(model="m"))
    with pytest.raises(ConfigError, match="init is required"):
        M.instruct_main(M.InstructConfig())
    with pytest.raises(ConfigError, match="text_replay"):
        M.AlignConfig(text_replay=1.5)


def test_unsupported_input_format(tmp_path):
    f = tmp_path / "clip.mp3"
    f.write_bytes(b"ID3")
    with pytest.raises(Exception, match="unsupported input format"):
        M._input_modality(M.GenerateConfig(model="m", input=str(f)))
    assert M._input_modality(M.GenerateConfig(model="m", input="seven")) == "text"


@pytest.mark.slow
def test_cli_mains_end_to_end(tmp_path):
    """tokenizers -> align -> instruct -> generate (image->text, text->image PNG, text->speech WAV) in subprocesses."""
    code = f"""
import dataclasses, sys
from lmlab.train.anygpt import model as M
tok = M.tokenizers_main(M.TokenizersConfig(out=r"{tmp_path}/tok", vq_steps=100, speech_train=4, speech_test=1,
                                           threads=1))
a = M.AlignConfig(out=r"{tmp_path}/align", tokenizers=str(tok), eval_n=10, n_pairs=400, threads=1)
a.stage0 = dataclasses.replace(a.stage0, steps=5); a.stage1 = dataclasses.replace(a.stage1, steps=10, batch_size=4)
al = M.align_main(a)
M.instruct_main(M.InstructConfig(out=r"{tmp_path}/inst", init=str(al), steps=5, batch_size=4, n_convs=50,
                                 eval_n=10, threads=1))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    from lmlab.train.anygpt.tokenizers import load_digit_images, save_png

    save_png(load_digit_images()["test_x"][0], tmp_path / "in.png")
    runs = {}
    for name, inp, outm in (("i2t", tmp_path / "in.png", "text"), ("t2i", "seven", "image"),
                            ("t2s", "three", "speech")):
        code = (f"from lmlab.train.anygpt import model as M; M.generate_main(M.GenerateConfig("
                f"model=r'{tmp_path}/inst', input=r'{inp}', output_modality='{outm}', out=r'{tmp_path}/{name}'))")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        runs[name] = tmp_path / name
    assert (runs["i2t"] / "output.txt").is_file()
    from PIL import Image

    assert Image.open(runs["t2i"] / "output.png").size == (64, 64)
    from lmlab.train.anygpt.tokenizers import read_wav

    assert len(read_wav(runs["t2s"] / "output.wav")) > 0
    assert np.isfinite(read_wav(runs["t2s"] / "output.wav")).all()
