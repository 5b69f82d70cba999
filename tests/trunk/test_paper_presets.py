"""The dense-* and family-* presets against the paper's Tables 1-2 (arXiv 2512.23407), number by number.

TABLES holds every number the presets claim, each with where it comes from: "paper" = printed in the
tables (as quoted in issue 11: dense-1b's shape, family-4b's depth and exits, the exits of family-2b/3b),
"reconstructed" = chosen in the paper's style (SwiGLU 3d, head dim 128, MHA, untied 151,936-token
vocabulary) so total parameters match the name. fam8b / fam12b appear only in the paper's Figs. 3-6."""
import pytest

from trunk.config import get_preset
from trunk.flops import param_counts

# name: (d_model, d_ff, n_heads, n_layers, exits, billions of total parameters in the name, source)
TABLES = {
    "dense-1b": (1536, 4608, 12, 19, (), 1, "paper"),
    "dense-2b": (2048, 6144, 16, 25, (), 2, "reconstructed"),
    "dense-3b": (2560, 7680, 20, 26, (), 3, "reconstructed"),
    "dense-4b": (2560, 7680, 20, 41, (), 4, "reconstructed (family-4b's trunk)"),
    "family-2b": (2048, 6144, 16, 25, (10,), 2, "paper exits; reconstructed trunk"),
    "family-3b": (2560, 7680, 20, 26, (6, 20), 3, "paper exits; reconstructed trunk"),
    "family-4b": (2560, 7680, 20, 41, (4, 16, 18), 4, "paper depth and exits; reconstructed width"),
    "fam8b": (3584, 10752, 28, 41, (4, 16, 18), 8, "reconstructed (Figs. 3-6 only)"),
    "fam12b": (4096, 12288, 32, 49, (5, 19, 22), 12, "reconstructed (Figs. 3-6 only)"),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_preset_matches_the_table(name):
    d, ff, heads, layers, exits, billions, _ = TABLES[name]
    cfg = get_preset(name)
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_layers, cfg.exit_layers) == (d, ff, heads, layers, exits)
    assert cfg.vocab_size == 151936 and not cfg.tie_embeddings and cfg.head_dim == 128
    assert cfg.n_kv_heads == cfg.n_heads                               # multi-head attention, as sized
    # the names count total parameters (embeddings and the untied head included)
    assert param_counts(cfg).total / 1e9 == pytest.approx(billions, rel=0.08)


def test_the_paper_1b_is_1_05b_total_but_0_58b_non_embedding():
    pc = param_counts(get_preset("dense-1b"))
    assert pc.total == pytest.approx(1.05e9, rel=0.01) and pc.non_embedding == pytest.approx(0.583e9, rel=0.01)


def test_families_share_their_dense_namesakes_trunk():
    for size in ("2b", "3b", "4b"):
        fam, dense = get_preset(f"family-{size}"), get_preset(f"dense-{size}")
        assert fam.replace(exit_layers=()) == dense


def test_benchmark_presets_are_untouched():
    """benchmarks/ depend on these shapes: they must not move with the paper presets."""
    want = {"tiny": (64, 4, 4, 2, 176, (1, 2)), "builtin": (192, 6, 6, 2, 512, (2, 4)),
            "20m": (384, 8, 6, 2, 1024, (2, 4, 6)), "100m": (768, 12, 12, 4, 2048, (3, 6, 9)),
            "1b": (2048, 22, 32, 4, 5632, (6, 11, 16))}
    for name, (d, L, h, kv, ff, ex) in want.items():
        c = get_preset(name)
        assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.exit_layers) == (d, L, h, kv, ff, ex)
