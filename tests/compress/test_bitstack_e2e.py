"""BitStack end to end on the tiny random ref:dense: artifact, exact byte accounting, nesting, resize, export,
bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmlab.compress import bitstack as bs
from lmlab.errors import LmlabError


def test_artifact_contents_and_residuals(small_stack):
    meta = bs.read_meta(small_stack)
    assert meta["niter"] == 3 and len(meta["stacks"]) == 14  # 2 layers x 7 linears
    assert meta["calib_samples"] == 4 and len(meta["calib_hash"]) == 16
    for name in ("blocks.safetensors", "extra.safetensors", "order.json", "scores.json", "results.json"):
        assert (small_stack / name).is_file()
    # residual Frobenius norm (scaled space, stored fp16 factors) never increases, for every linear
    for norms in meta["residual_norms"]:
        assert all(b <= a * (1 + 1e-6) for a, b in zip(norms, norms[1:])), norms
    scores = json.loads((small_stack / "scores.json").read_text())["levels"]
    assert len(scores) == 2 and all(len(level) == 14 for level in scores)
    order = bs.read_order(small_stack)
    assert set(order["orders"]) == {"average", "greedy", "random"}
    assert len(order["sizes"]["average"]) == 2 * 14 + 1


def test_loaded_bytes_exact_and_largest_fitting(small_stack):
    sizes = bs.read_order(small_stack)["sizes"]["average"]
    for steps in (0, 5, len(sizes) - 1):
        budget = sizes[steps] + (sizes[steps + 1] - sizes[steps]) // 2 if steps + 1 < len(sizes) else sizes[-1]
        m = bs.load(small_stack, budget, dtype=torch.float16)
        assert m.bitstack.steps == steps  # the largest prefix that fits
        assert bs.weight_bytes(m) == m.bitstack.bytes == sizes[steps] <= budget
        if steps + 1 < len(sizes):
            assert sizes[steps + 1] > budget


def test_configs_nest_and_one_step_adds_one_block(small_stack):
    meta = bs.read_meta(small_stack)
    order = bs.read_order(small_stack)["orders"]["average"]
    n = len(meta["stacks"])
    prev = bs.counts_at(order, n, 0)
    for s in range(1, len(order) + 1):
        cur = bs.counts_at(order, n, s)
        diff = [c - p for c, p in zip(cur, prev)]
        assert sorted(diff) == [0] * (n - 1) + [1]
        assert max(cur) - min(cur) <= 1  # average order: stacks never differ by more than one block
        prev = cur


def test_resize_moves_only_the_difference_and_matches_a_fresh_load(small_stack, tiny_tok):
    sizes = bs.read_order(small_stack)["sizes"]["average"]
    m = bs.load(small_stack, sizes[3])
    moved = m.bitstack.resize(sizes[10])
    assert moved == {"added": 7, "dropped": 0, "bytes": sizes[10]}
    moved = m.bitstack.resize(sizes[8])
    assert moved["dropped"] == 2 and moved["added"] == 0
    fresh = bs.load(small_stack, sizes[8])
    x = torch.tensor([[1, 5, 9, 20, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(m(input_ids=x).logits, fresh(input_ids=x).logits, atol=1e-5)
    small = bs.load(small_stack, sizes[0])
    with torch.no_grad():
        assert not torch.allclose(small(input_ids=x).logits, fresh(input_ids=x).logits, atol=1e-4)


def test_full_stack_approximates_the_original(small_stack):
    from lmlab.core.models import load_model

    orig = load_model("ref:dense")
    m = bs.load(small_stack)
    for name, lin in orig.named_modules():
        if name.endswith("q_proj"):
            W = lin.weight.detach()
            err = torch.linalg.norm(W - m.get_submodule(name).weight) / torch.linalg.norm(W)
            assert err < 0.5  # 3 blocks of a random matrix: (0.36 .. 0.7)^(3/2) of the norm


def test_budget_units_and_errors(small_stack):
    assert bs.parse_bytes("3000MiB") == 3000 * 2**20
    assert bs.parse_bytes("3000MB") == 3_000_000_000
    assert bs.parse_bytes("2.5GB") == 2_500_000_000 and bs.parse_bytes("1024") == 1024
    with pytest.raises(LmlabError, match="cannot parse"):
        bs.parse_bytes("lots")
    sizes = bs.read_order(small_stack)["sizes"]["average"]
    with pytest.raises(LmlabError, match="below this stack's minimum"):
        bs.load(small_stack, sizes[0] - 1)


def test_corrupt_and_truncated_block_files(small_stack, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_stack, bad)
    f = bad / "blocks.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    f.write_bytes(bytes(data))
    with pytest.raises(LmlabError, match="corrupt"):
        bs.load(bad)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(LmlabError, match="truncated"):
        bs.load(bad)
    (bad / "blocks.safetensors").unlink()
    with pytest.raises(LmlabError, match="missing"):
        bs.load(bad)
    with pytest.raises(LmlabError, match="not a BitStack folder"):
        bs.load(tmp_path)


def test_export_to_plain_hf_folder(small_stack, tmp_path):
    from lmlab.core.models import load_model

    sizes = bs.read_order(small_stack)["sizes"]["average"]
    m = bs.load(small_stack, sizes[12])
    out = bs.export_hf(m, tmp_path / "hf")
    plain = load_model(str(out))
    x = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, m(input_ids=x).logits, atol=1e-4)


def test_load_main_and_sizes(small_stack, text_file, tmp_path):
    sizes = bs.read_order(small_stack)["sizes"]["average"]
    out = bs.load_main(bs.LoadConfig(stack=str(small_stack), max_memory=[str(sizes[2]), f"{sizes[-1]}"],
                                     eval_data=str(text_file), max_tokens=256, samples=1, out=str(tmp_path / "r"),
                                     export=str(tmp_path / "hf")))
    res = json.loads((out / "results.json").read_text())["results"]
    assert [r["bytes"] for r in res] == [sizes[2], sizes[-1]]
    assert res[1]["bpb"] > 0 and res[1]["moved"]["added"] == len(sizes) - 3
    assert (tmp_path / "hf" / "config.json").is_file() and (out / "samples.jsonl").is_file()
    text = bs.sizes_main(bs.SizesConfig(stack=str(small_stack)))
    assert f"{sizes[0]:,} B" in text and f"{sizes[-1]:,} B" in text and f"sizes {len(sizes)}" in text


def test_below_minimum_fails_before_run_dir(small_stack, tmp_path):
    with pytest.raises(LmlabError, match="minimum"):
        bs.load_main(bs.LoadConfig(stack=str(small_stack), max_memory=["10B"], out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_nan_weights_and_no_linears_fail_before_run_dir(ref_zoo, tiny_tok, tmp_path):
    from lmlab.core.models import load_model

    m = load_model("ref:dense")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(tmp_path / "nan")
    tiny_tok.save_pretrained(tmp_path / "nan")
    with pytest.raises(LmlabError, match="NaN or inf"):
        bs.main(bs.BitStackConfig(model=str(tmp_path / "nan"), out=str(tmp_path / "o1"), data_free=True))
    assert not (tmp_path / "o1").exists()
    with pytest.raises(LmlabError, match="no decomposable"):
        bs.main(bs.BitStackConfig(model="ref:mamba", out=str(tmp_path / "o2"), data_free=True))
    assert not (tmp_path / "o2").exists()
    with pytest.raises(LmlabError):
        bs.main(bs.BitStackConfig(model=str(tmp_path / "nope"), out=str(tmp_path / "o3"), data_free=True))
    assert not (tmp_path / "o3").exists()


def test_data_free_mode(ref_zoo, tmp_path):
    out = bs.main(bs.BitStackConfig(out=str(tmp_path / "df"), niter=2, data_free=True, modules=["up_proj"]))
    meta = bs.read_meta(out)
    assert meta["calib_samples"] == 0 and meta["scale_bytes"] == 0
    m = bs.load(out, dtype=torch.float16)
    assert bs.weight_bytes(m) == m.bitstack.bytes


def test_interrupted_sort_resumes(small_stack, text_file, tmp_path):
    """A run dir whose sort stopped after level 1 finishes with the same scores, reusing the decomposition."""
    run = tmp_path / "resume"
    shutil.copytree(small_stack, run)
    full = json.loads((run / "scores.json").read_text())["levels"]
    (run / "scores.json").write_text(json.dumps({"levels": full[:1]}))
    (run / "order.json").unlink()
    (run / "results.json").unlink()
    blocks_mtime = (run / "blocks.safetensors").stat().st_mtime_ns
    cfg = json.loads((run / "bitstack.json").read_text())["settings"]
    out = bs.main(bs.BitStackConfig(out=str(run), niter=3, calib=str(text_file), calib_samples=4, sort_samples=2,
                                    seqlen=32, threads=1, seed=cfg["seed"]))
    assert (out / "blocks.safetensors").stat().st_mtime_ns == blocks_mtime  # not decomposed again
    again = json.loads((out / "scores.json").read_text())["levels"]
    assert again[0] == full[0] and again[1] == pytest.approx(full[1], rel=1e-6)
    assert bs.read_order(out)["orders"]["average"] == bs.read_order(small_stack)["orders"]["average"]
    with pytest.raises(LmlabError, match="other settings"):
        (out / "results.json").unlink()
        bs.main(bs.BitStackConfig(out=str(run), niter=4, calib=str(text_file), calib_samples=4, sort_samples=2,
                                  seqlen=32))


def test_rank_k_above_one_saves_and_loads(ref_zoo, tmp_path):
    """An overridden k > 1 (the issue's "k overridable") builds, saves and loads with exact byte accounting."""
    out = bs.main(bs.BitStackConfig(out=str(tmp_path / "k3"), niter=2, k=3, data_free=True,
                                    modules=["q_proj"]))
    meta = bs.read_meta(out)
    assert {s["k"] for s in meta["stacks"]} == {3}
    m = bs.load(out, dtype=torch.float16)
    assert bs.weight_bytes(m) == m.bitstack.bytes
    mod = m.get_submodule(meta["stacks"][0]["name"])
    assert tuple(mod.b0_u.shape) == (meta["stacks"][0]["shape"][0], 3)
