"""Activation source: one forward for all hooks, special-token masking, shuffling buffer, resumable shards."""

from __future__ import annotations

import torch

from lmlab.interp.activations import ActivationStore, LMActivationSource, ShardCache


def _source(model, names, cache=None, n=2000):
    ids = torch.randint(3, 99, (n,), generator=torch.Generator().manual_seed(0))
    ids[::37] = 2  # EOS between "documents"
    return LMActivationSource(model, names, ids, seq_len=16, lm_batch=4, bos_id=1, special_ids=[0, 1, 2],
                              cache=cache)


def test_one_forward_feeds_every_hook_and_masks_specials(tiny_llama):
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    calls = []
    h = tiny_llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        src = _source(tiny_llama, names)
        batch = next(src.lm_batches(10))
    finally:
        h.remove()
    assert len(calls) == 1 == src.forward_calls
    assert set(batch["acts"]) == set(names) and batch["acts"][names[0]].shape == (4, 16, 32)
    ids, mask = batch["input_ids"], batch["mask"]
    assert (ids[:, 0] == 1).all() and not mask[:, 0].any()  # BOS prepended and excluded
    assert not mask[ids == 2].any() and mask[(ids > 2)].all()


def test_mamba_mixer_hook(tiny_mamba):
    src = _source(tiny_mamba, ["blocks.1.hook_mixer_out"])
    rows = src.collect(50)
    assert rows["blocks.1.hook_mixer_out"].shape == (50, 32)


def test_shuffling_buffer_refills_when_half_consumed(tiny_llama):
    src = _source(tiny_llama, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    store = ActivationStore(src, [("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")], buffer_tokens=120,
                            batch_size=20, seed=0)
    first = store.next_batch()
    x, y = first[("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")]
    assert x.shape == (20, 32) and y.shape == (20, 32)
    calls_after_fill = src.forward_calls
    for _ in range(2):
        store.next_batch()
    assert src.forward_calls == calls_after_fill  # 60 of 120 rows consumed: no refill yet
    store.next_batch()
    assert src.forward_calls > calls_after_fill  # the consumed half was refilled


def test_transcoder_rows_stay_aligned(tiny_llama):
    """In and out rows come from the same token: resid_post(0) = resid_pre(1) row by row after shuffling."""
    src = _source(tiny_llama, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    store = ActivationStore(src, [("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")], buffer_tokens=64,
                            batch_size=16)
    for _ in range(5):
        x, y = store.next_batch()[("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")]
        assert torch.equal(x, y)


def test_shard_cache_resumes_without_recomputing(tiny_llama, tmp_path):
    names = ["blocks.0.hook_resid_post"]
    fp = {"test": 1}
    src = _source(tiny_llama, names, ShardCache(tmp_path, fp))
    first = list(src.lm_batches(200))
    assert src.forward_calls == len(first) and ShardCache(tmp_path, fp).n_shards() == len(first)
    again = _source(tiny_llama, names, ShardCache(tmp_path, fp))
    second = list(again.lm_batches(300))  # reads the finished shards, then continues with the LM
    assert again.forward_calls == len(second) - len(first)
    for a, b in zip(first, second):
        assert torch.equal(a["acts"][names[0]], b["acts"][names[0]])
    import pytest

    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="other settings"):
        ShardCache(tmp_path, {"test": 2})
