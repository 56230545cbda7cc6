"""Shared fixtures: one thread, offline, seeded, tiny random models built in-process (< 1 s each)."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The whole session uses a private lmlab cache (corpus, tokens, user zoo): tests never read or write the user's
# ~/.cache/lmlab. Set LMLAB_TEST_CACHE to reuse one cache across sessions (faster corpus builds).
if os.environ.get("LMLAB_TEST_CACHE"):
    os.environ["LMLAB_CACHE"] = os.environ["LMLAB_TEST_CACHE"]
else:
    os.environ["LMLAB_CACHE"] = tempfile.mkdtemp(prefix="lmlab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LMLAB_CACHE"], ignore_errors=True)

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


# ---------------------------------------------------------------------------------------------------------------
# a tiny reference zoo in the private cache: ref:dense / ref:mamba resolve to it (the user zoo wins over shipped)

TINY_ARCH = {
    "dense": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 256},
    "mamba": {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "num_heads": 4, "expand": 2,
              "state_size": 8, "n_groups": 1, "chunk_size": 16},
}
"""Overrides that shrink ``zoo.ARCHS[name](vocab)`` to test size (< 0.1 M params each)."""


def make_tiny_ref(name: str, tok):
    """A random-init reference architecture ``name`` shrunk by :data:`TINY_ARCH` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from lmlab.core import zoo

    config = zoo.ARCHS[name](len(tok))
    for k, v in {**TINY_ARCH[name], **zoo._special_ids(tok)}.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ref_zoo(tiny_tok) -> Path:
    """Installs a tiny reference tokenizer (tiny_tok, vocab 300) and tiny random ``dense``/``mamba`` models
    into the private cache's user zoo, laid out as ``lmlab zoo train`` installs them (model + tokenizer +
    lmlab_card.json). Returns the zoo folder; ``ref:dense`` / ``ref:mamba`` then load these."""
    from lmlab.core import zoo
    from lmlab.core.models import n_params
    from lmlab.core.tokenizer import save_tokenizer

    root = zoo.user_zoo()
    save_tokenizer(tiny_tok, root / "tokenizer")
    for name in ("dense", "mamba"):
        model = make_tiny_ref(name, tiny_tok)
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        tiny_tok.save_pretrained(out)
        info = {"name": name, "arch": type(model).__name__, "params": n_params(model), "steps": 0,
                "train_tokens": 0, "seed": 0, "tokenizer_hash": zoo.tokenizer_hash(tiny_tok),
                "val": {"math": {"loss": 5.7, "ppl": 300.0, "bpb": 3.0, "tokens": 1.0, "bytes": 1.0}},
                "command": "tests/conftest.py ref_zoo (random init)"}
        (out / zoo.CARD).write_text(json.dumps(info, indent=2) + "\n")
    return root
