"""Feature geometry and split detection (lmlab.interp.geometry): planted splits, random dictionaries, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.interp.geometry import (
    GeometryConfig,
    SplitParams,
    check_compatible,
    detect_splits,
    firing_positions,
    main,
    match_latents,
    nearest_neighbour_cos,
    random_directions,
    unit_rows,
)
from lmlab.interp.sae import SAE, save_sae

D = 64


def _sae(atoms: torch.Tensor, k: int, hook: str = "blocks.1.hook_resid_post", model: str = "ref:dense") -> SAE:
    """A Top-K SAE whose decoder rows are ``atoms`` (unit) and whose encoder is their transpose."""
    n, d = atoms.shape
    s = SAE(d, n, k, hook_name=hook, model_name=model)
    with torch.no_grad():
        s.W_dec.copy_(unit_rows(atoms))
        s.W_enc.copy_(unit_rows(atoms).T)
    return s.eval()


def _fires(sae: SAE, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)  # (N, d_sae)
    nz = f.nonzero()
    return firing_positions(nz[:, 0], nz[:, 1], sae.d_sae)


def planted(n_tokens: int = 3000, seed: int = 0):
    """A parent direction p in the small dictionary; the large one holds 3 children c_a = norm(p + 0.9 delta_a)
    (delta_a orthonormal, orthogonal to p) and each child's context (tokens x = amp * c_a) is disjoint."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    p, deltas = Q[:, 0], Q[:, 1:4].T  # (D,), (3, D)
    children = unit_rows(p[None] + 0.9 * deltas)  # (3, D)
    background = unit_rows(torch.randn(60, D, generator=g))
    extra = unit_rows(torch.randn(40, D, generator=g))
    small = _sae(torch.cat([background, p[None]]), k=1)  # parent = latent 60
    large = _sae(torch.cat([background, extra, children]), k=1)  # children = latents 100, 101, 102
    ctx = torch.rand(n_tokens, generator=g) < 0.3
    which = torch.randint(0, 3, (n_tokens,), generator=g)
    bg = torch.randint(0, 60, (n_tokens,), generator=g)
    amp = 1.0 + 0.5 * torch.rand(n_tokens, 1, generator=g)
    x = torch.where(ctx[:, None], children[which], background[bg]) * amp
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    return small, large, x, (60, {100, 101, 102})


def test_planted_split_is_found():
    small, large, x, (parent, kids) = planted()
    splits = detect_splits(small.W_dec, large.W_dec, _fires(small, x), _fires(large, x))
    assert len(splits) == 1
    s = splits[0]
    assert s["parent"] == parent
    assert {c["latent"] for c in s["children"]} == kids
    assert s["coverage"] > 0.95 and s["max_overlap"] < 0.05
    assert all(0.2 < c["share"] < 0.5 and c["cos"] > 0.7 for c in s["children"])


def test_no_split_between_unrelated_random_dictionaries():
    g = torch.Generator().manual_seed(1)
    small = _sae(torch.randn(64, 32, generator=g), k=4)
    large = _sae(torch.randn(256, 32, generator=g), k=4)
    x = torch.randn(4000, 32, generator=g)
    fs, fl = _fires(small, x), _fires(large, x)
    assert sum(f.numel() > 10 for f in fs) > 50  # the latents do fire; the detector has something to judge
    assert detect_splits(small.W_dec, large.W_dec, fs, fl) == []
    # a dictionary compared with itself persists: every latent has one identical child, never a split
    assert detect_splits(small.W_dec, small.W_dec, fs, fs) == []


def test_split_needs_partitioned_contexts():
    """Children that all fire on every parent token (no partition) are not a split."""
    small, large, x, (parent, kids) = planted()
    fs, fl = _fires(small, x), _fires(large, x)
    union = torch.unique(torch.cat([fl[j] for j in kids]))
    fl_mixed = [union if j in kids else f for j, f in enumerate(fl)]
    assert detect_splits(small.W_dec, large.W_dec, fs, fl_mixed) == []
    # with the overlap constraint lifted the same children are reported
    loose = SplitParams(max_overlap=1.0, min_children=2)
    assert len(detect_splits(small.W_dec, large.W_dec, fs, fl_mixed, loose)) == 1


def test_geometry_maths():
    W = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    W[1] = W[0] + 0.05 * W[2]
    nn = nearest_neighbour_cos(W)
    expect = float(torch.nn.functional.cosine_similarity(W[0], W[1], dim=0))
    assert abs(float(nn[0]) - expect) < 1e-5 and abs(float(nn[1]) - expect) < 1e-5
    brute = unit_rows(W) @ unit_rows(W).T
    brute.fill_diagonal_(-2)
    assert torch.allclose(nn, brute.max(1).values, atol=1e-6)
    R = random_directions(512, 64)
    assert abs(float(R.norm(dim=1).mean()) - 1) < 1e-5
    cos, idx = match_latents(W[:5], W, top=3)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4] and torch.allclose(cos[:, 0], torch.ones(5), atol=1e-5)


def test_incompatible_saes_are_refused():
    a = _sae(torch.randn(8, 16), 2, hook="blocks.0.hook_resid_post")
    b = _sae(torch.randn(32, 16), 2, hook="blocks.1.hook_resid_post")
    with pytest.raises(LmlabError, match="different hook points"):
        check_compatible(a, b)
    c = _sae(torch.randn(32, 16), 2, hook="blocks.0.hook_resid_post", model="ref:mamba")
    with pytest.raises(LmlabError, match="different models"):
        check_compatible(a, c)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, tiny_corpus):
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("geo-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


def test_geometry_run_end_to_end(ref_zoo, text_file, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    small = _sae(base, 4)
    large = _sae(torch.cat([base + 0.3 * torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)]), 4)
    save_sae(small, tmp_path / "small")
    save_sae(large, tmp_path / "large")
    out = main(GeometryConfig(small=str(tmp_path / "small"), large=str(tmp_path / "large"), tokens=1024,
                              data=str(text_file), max_bytes=200_000, seq_len=32, out=str(tmp_path / "run")))
    res = json.loads((out / "results.json").read_text())
    assert res["small"]["d_sae"] == 64 and res["large"]["d_sae"] == 128
    assert res["match_best_cos"]["median"] > 0.8  # the large dictionary contains perturbed copies
    assert res["nn_cos"]["nn_random_large"]["mean"] < res["match_best_cos"]["mean"]
    for f in ("splits.html", "plots/nn_cosine.png", "plots/decoder_map.png", "plots/match_cosine.png"):
        assert (out / f).is_file()
    other = _sae(torch.randn(64, 32, generator=g), 4, hook="blocks.0.hook_resid_post")
    save_sae(other, tmp_path / "other")
    with pytest.raises(LmlabError, match="different hook points"):
        main(GeometryConfig(small=str(tmp_path / "other"), large=str(tmp_path / "large"), out=str(tmp_path / "r2")))
    assert not (tmp_path / "r2").exists()


LEAVES = [
    ("interp sae geometry", "lmlab.interp.geometry:main", "lmlab.interp.geometry:GeometryConfig",
     "feature geometry and splitting between a small and a large SAE (decoder cosines, splits, PCA map)",
     ("small", "large")),
    ("interp sae transfer", "lmlab.interp.generalization:main_transfer", "lmlab.interp.generalization:TransferConfig",
     "splice base-model SAEs into a fine-tuned model; compare with an SAE trained on it", ("sae",)),
]


@pytest.fixture
def commands(monkeypatch):
    from lmlab import cli

    have = {c.words for c in cli.COMMANDS}
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [cli.Leaf(*r) for r in LEAVES if r[0] not in have])
    return cli


@pytest.mark.parametrize("words", [r[0] for r in LEAVES])
def test_cli_help(commands, words, capsys):
    with pytest.raises(SystemExit) as e:
        commands.main([*words.split(), "--help"])
    assert e.value.code == 0 and "--tokens" in capsys.readouterr().out


def test_cli_geometry_refuses_mismatched_hooks(commands, tmp_path, capsys):
    save_sae(_sae(torch.randn(8, 16), 2, hook="blocks.0.hook_resid_post"), tmp_path / "a")
    save_sae(_sae(torch.randn(32, 16), 2, hook="blocks.1.hook_resid_post"), tmp_path / "b")
    rc = commands.main(["interp", "sae", "geometry", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                        str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "different hook points" in err and len(err.strip().splitlines()) == 1
