"""The FLOP formula against torch's FlopCounterMode on a real forward + backward of a small family."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trunk import FamilyModel, get_preset
from trunk.flops import flop_breakdown, flops_per_token, param_counts, tokens_for_budget
from trunk.loss import family_loss


@pytest.mark.parametrize("branch,adapter,unembed,tie", [(0, 0, "tied", True), (1, 8, "own", False)])
def test_matmul_flops_match_counter(branch, adapter, unembed, tie):
    cfg = get_preset("tiny").replace(vocab_size=1000, d_model=128, d_ff=352, exit_layers=(1, 3),
                                     branch_layers=branch, adapter_rank=adapter, exit_unembed=unembed,
                                     tie_embeddings=tie)
    model = FamilyModel(cfg)
    B, T = 2, 64
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    # The math backend spells attention as bmm's, which the counter sees (CPU flash attention it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = family_loss(model, x[:, :-1], x[:, 1:])
        loss.backward()
    counted = counter.get_total_flops()
    ours = flop_breakdown(cfg, T).matmul * B * T
    assert abs(ours - counted) / counted < 0.02, (ours, counted)


def test_conventions_and_budget():
    cfg = get_preset("100m")
    full = flops_per_token(cfg)
    six_n = flops_per_token(cfg, convention="6N", heads=False)
    assert six_n == pytest.approx(6 * param_counts(cfg).non_embedding)
    # heads add 6*d*V per exit; embeddings add 6*V*d once
    d, V = cfg.d_model, cfg.vocab_size
    assert flops_per_token(cfg, convention="6N") - six_n == pytest.approx(6 * d * V * cfg.G)
    assert flops_per_token(cfg, embeddings=True) - full == pytest.approx(6 * V * d)
    assert flops_per_token(cfg, heads=False) < full
    # attention grows with context
    assert flops_per_token(cfg, 4096) > flops_per_token(cfg, 1024)
    assert tokens_for_budget(cfg, 1e19) == pytest.approx(1e19 / full)
    with pytest.raises(ValueError):
        tokens_for_budget(cfg, 0)
    with pytest.raises(ValueError, match="convention"):
        flops_per_token(cfg, convention="kaplan")


def test_more_exits_cost_more():
    base = get_preset("100m")
    g1 = flops_per_token(base.replace(exit_layers=()))
    g4 = flops_per_token(base)
    assert g4 - g1 == pytest.approx(3 * (6 * base.d_model * base.vocab_size + 12 * base.d_model))
