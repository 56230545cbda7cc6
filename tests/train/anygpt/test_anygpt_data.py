"""AnyGPT vocabulary expansion, templates, masks and the data-level traps (fast, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.train.anygpt import data as D
from lmlab.train.anygpt.tokenizers import DIGIT_WORDS


def _llama(vocab: int, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bpe():
    from lmlab.core.tokenizer import train_bpe

    return lambda: train_bpe(D.bpe_texts(0), vocab_size=300)


def _fake_sources(seed: int = 0) -> D.Sources:
    rng = np.random.default_rng(seed)
    y = np.arange(100) % 10
    return D.Sources(rng.integers(0, 64, (100, 4)), y, rng.integers(0, 64, (20, 4)), y[:20],
                     [rng.integers(0, 64, int(rng.integers(15, 30))).tolist() for _ in range(100)], y,
                     [rng.integers(0, 64, 20).tolist() for _ in range(20)], y[:20])


@pytest.mark.parametrize("tie", [True, False])
def test_expand_keeps_text_ids_and_logits(bpe, tie, tmp_path):
    tok = bpe()
    model = _llama(len(tok), tie)
    texts = ["three plus four is seven.", "a handwritten digit nine", "Describe the image. <img>"]
    before_ids = [D.encode(tok, t) for t in texts]
    x = torch.tensor([before_ids[0]])
    with torch.no_grad():
        before = model(x).logits
    vm = D.expand_vocab(tok, model, {"image": 64, "speech": 32})
    assert len(tok) == 300 + 4 + 2 + 64 + 2 + 32 == model.get_input_embeddings().weight.shape[0]
    assert [D.encode(tok, t) for t in texts] == before_ids
    with torch.no_grad():
        after = model(x).logits
    assert after.shape[-1] == len(tok)
    torch.testing.assert_close(after[..., :vm.text_vocab], before, rtol=0, atol=0)
    # every added string is one token with the id the map says
    for m in ("image", "speech"):
        for code in (0, vm.modalities[m]["size"] - 1):
            s = D.modality_token(m, code)
            assert D.encode(tok, s) == [vm.modalities[m]["offset"] + code]
    assert D.encode(tok, D.mm_string("image", [1, 2, 3, 4])) == [
        vm.modalities["image"]["start"], *[vm.modalities["image"]["offset"] + c for c in (1, 2, 3, 4)],
        vm.modalities["image"]["end"]]
    # new rows sit near the mean of the old ones (mean resizing), not at the old rows
    w = model.get_input_embeddings().weight.detach()
    new_mean = w[vm.text_vocab:].mean(0)
    assert torch.norm(new_mean - w[:vm.text_vocab].mean(0)) < 0.5 * torch.norm(w[:vm.text_vocab].std(0))
    # save / load as a normal HF folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    vm.save(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert D.VocabMap.load(tmp_path) == vm
    assert D.encode(tok2, D.mm_string("speech", [5, 6])) == D.encode(tok, D.mm_string("speech", [5, 6]))
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, after)


def test_expand_padded_vocab_does_not_shrink(bpe):
    tok = bpe()
    model = _llama(1024)  # padded vocabulary, larger than tokenizer + added tokens
    x = torch.tensor([D.encode(tok, "five minus two is three.")])
    with torch.no_grad():
        before = model(x).logits
    vm = D.expand_vocab(tok, model, {"image": 16})
    assert model.get_input_embeddings().weight.shape[0] == 1024
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after[..., :vm.text_vocab], before[..., :vm.text_vocab], rtol=0, atol=0)
    w = model.get_input_embeddings().weight
    torch.testing.assert_close(w[vm.modalities["image"]["offset"]], w[:vm.text_vocab].mean(0))


def test_expand_errors(bpe):
    tok = bpe()

    class NoEmbeddings(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError

    with pytest.raises(LmlabError, match="cannot resize its vocabulary"):
        D.expand_vocab(tok, NoEmbeddings(), {"image": 8})
    with pytest.raises(LmlabError, match="not a Hugging Face tokenizer"):
        D.expand_vocab(object(), None, {"image": 8})
    with pytest.raises(LmlabError, match="unknown modality"):
        D.expand_vocab(tok, None, {"video": 8})
    D.expand_vocab(tok, None, {"image": 8})
    with pytest.raises(LmlabError, match="expanded already"):
        D.expand_vocab(tok, None, {"image": 8})


def test_prompt_boundary_trap(bpe):
    """Prompts end at '[AnyGPT]:' and are token prefixes of their training text; a trailing space is not."""
    tok = bpe()
    D.expand_vocab(tok, None, {"image": 64, "speech": 64})
    src = _fake_sources()
    for d, inp, out, instr, _ in D.stage1_samples(src, 40):
        prompt = D.stage1_prompt(d, inp, instr)
        assert not prompt.endswith(" ")
        n = D.check_prompt_prefix(tok, prompt, D.stage1_text(d, inp, out, instr))
        assert n == len(D.encode(tok, prompt))
    d, inp, out, instr, _ = D.stage1_samples(src, 1)[0]  # image->text: answer "a handwritten digit ..."
    with pytest.raises(LmlabError, match="prefix"):
        D.check_prompt_prefix(tok, D.stage1_prompt(d, inp, instr) + " ", D.stage1_text(d, inp, out, instr))


def test_chat_mask_spans(bpe):
    tok = bpe()
    vm = D.expand_vocab(tok, None, {"image": 64, "speech": 64})
    turns = [(f"{D.mm_string('image', [1, 2, 3, 4])} What is in this picture?", D.caption(7)),
             ("Now say it.", D.mm_string("speech", [3, 3, 9]))]
    ids, labels = D.chat_masked(tok, turns)
    assert len(ids) == len(labels)
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert len(spans) == 2
    # the first labelled token carries the space after "[AnyGPT]:" and each span ends with <eoa>
    assert tok.decode(spans[0]).startswith(" a handwritten digit seven")
    assert spans[0][-1] == spans[1][-1] == vm.roles[D.EOA]
    assert D.BOT not in tok.decode(spans[0] + spans[1])
    assert spans[1][:2] == D.encode(tok, " " + D.mm_string("speech", [3]))[:2]


def test_caption_budget_trap(bpe):
    """A text budget must count BPE tokens: the default covers the longest caption, a short one cannot."""
    from lmlab.train.anygpt.model import text_budget

    tok = bpe()
    D.expand_vocab(tok, None, {"image": 8})
    caps = [D.caption(d) for d in range(10)]
    longest = max(len(D.encode(tok, " " + c)) for c in caps)
    assert text_budget(tok, caps) >= longest + 1
    assert longest > 4  # a budget of a few 'words' is too short
    truncated = tok.decode(D.encode(tok, " " + D.caption(7))[: longest // 2])
    assert D.read_digit(truncated) is None
    assert D.read_digit(" " + D.caption(7)) == 7


def test_replay_mix():
    src = _fake_sources()
    none = D.stage2_conversations(src, 200, replay=0.0)
    assert all(isinstance(c, list) for c in none)
    kinds = {len(c) for c in none}
    assert kinds == {1, 2}  # single-turn cross-modal and the multi-turn caption -> "Now say it." -> speech
    mixed = D.stage2_conversations(src, 400, replay=0.5)
    replay = [c for c in mixed if isinstance(c, str)]
    assert 0.35 < len(replay) / len(mixed) < 0.65
    assert any(D.BOT in c and "This is input:" in c for c in replay)  # stage-1 text->x pairs
    assert any(D.BOT not in c for c in replay)  # plain text


def test_text_corpus_split_and_read_digit():
    train, val = D.text_corpus(0)
    assert len(val) == 150 and not set(train) & set(val)
    assert D.read_digit("Seven.") == 7 and D.read_digit("nothing here") is None
    assert [D.read_digit(D.caption(d)) for d in range(10)] == list(range(10))
    assert DIGIT_WORDS[0] == "zero"


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3])
def test_stage1_text_replay_is_a_token_share(bpe, share):
    """``text_replay`` is the plain-text share of stage-1 *tokens* (text documents are much shorter than pairs)."""
    from lmlab.train.anygpt.model import stage1_docs

    tok = bpe()
    docs = stage1_docs(tok, _fake_sources(), 400, share, seed=0)
    n_tok = [(len(D.encode(tok, d)), D.BOT not in d) for d in docs]
    text = sum(n for n, is_text in n_tok if is_text)
    assert sum(1 for d in docs if D.BOT in d) == 400
    assert abs(text / sum(n for n, _ in n_tok) - share) < 0.03
