"""Shared fixtures: one thread, offline, seeded, tiny random models built in-process (< 1 s each)."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def make_tiny_llama(vocab_size: int = 99, attn: str = "eager", tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=37, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def make_tiny_mamba(vocab_size: int = 99):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=vocab_size, hidden_size=32, state_size=8, num_hidden_layers=2,
                      expand=2, conv_kernel=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return MambaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """LlamaModelTester numbers: vocab 99, hidden 32, 2 layers, 4 heads, intermediate 37, eager attention."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_mamba():
    """Mamba: vocab 99, hidden 32, state 8, 2 layers."""
    return make_tiny_mamba()


@pytest.fixture(scope="session")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CI has it; a user's clone does not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present in the project's CI checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus():
    """A small real Corpus (~10 kB): two stdlib modules as code, docstrings/comments of three as prose,
    60 math problems; val_fraction 0.1. Built in-process from lmlab.core.corpus (no cache, < 0.1 s)."""
    from lmlab.core import corpus

    root = corpus.stdlib_root()
    files = [root / name for name in ("bisect.py", "colorsys.py", "heapq.py")]
    docs = {
        "code": corpus.code_docs(files[:2]),
        "prose": corpus.prose_docs(files, topics=False),
        "math": [p["text"] for p in corpus.math_problems(60, seed=0)],
    }
    return corpus.corpus_from_docs(docs, val_fraction=0.1)


@pytest.fixture(scope="session")
def tiny_tok(tiny_corpus):
    """Byte-level BPE (vocab 300, specials <|endoftext|>=0, <|pad|>=1) trained on tiny_corpus's train split."""
    from lmlab.core.tokenizer import train_bpe

    return train_bpe(tiny_corpus.texts("train"), vocab_size=300)
