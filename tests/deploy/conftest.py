"""Tiny random checkpoints for the deploy tests (made here, never downloaded)."""
import pytest
import torch

from trunk.checkpoint import save_checkpoint
from trunk.config import get_preset
from trunk.model import FamilyModel
from trunk.tokenizer import ByteTokenizer

# Named variants of the tiny preset: tied shallow exits, branch layers, own unembeddings, untied LM head
VARIANTS = {
    "tied": {},
    "branch": dict(branch_layers=1),
    "own": dict(exit_unembed="own"),
    "branch_own": dict(branch_layers=1, exit_unembed="own"),
    "untied_adapter_branch": dict(tie_embeddings=False, branch_layers=1, adapter_rank=4, qkv_bias=True),
}


def random_family(variant: str, seed: int = 0) -> FamilyModel:
    torch.manual_seed(seed)
    model = FamilyModel(get_preset("tiny").replace(**VARIANTS[variant])).eval()
    with torch.no_grad():  # larger than the init scale so logits are peaked and argmax is stable
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    made = {}

    def make(variant: str = "tied"):
        if variant not in made:
            d = tmp_path_factory.mktemp(f"ckpt-{variant}")
            model = random_family(variant)
            save_checkpoint(d, model, ByteTokenizer(), exit_val_loss=[3.0, 2.5, 2.0])
            made[variant] = (d, model)
        return made[variant]

    return make


def _run_chain(stages, tokens_BT, chunks):
    """Feed tokens through every stage chunk by chunk (each stage over its own KV pool, one slot per
    batch row, advancing positions), evaluating every held exit at every row; per-exit logits (B, T, V)
    concatenated over chunks. The rows a stage hands on are read from its pool's output log."""
    from trunk.kv_pool import KVPool
    from trunk.sampling import ExitPolicy
    from trunk.stage import SeqRun

    B = tokens_BT.shape[0]
    G = stages[0].cfg.G
    pools = [KVPool(st.pool_shape(64), B, "cpu") for st in stages]
    never = ExitPolicy("max_prob", 2.0)  # a confidence policy that never passes: every held exit is evaluated
    out = {}
    for a, b in chunks:
        x = tokens_BT[:, a:b].reshape(-1)
        for st, pool in zip(stages, pools):
            n_seg = len(st.segments)
            runs = [SeqRun(r, a, b - a, [a] * n_seg, want=G - 1, policy=never, keep_logits=True) for r in range(B)]
            o = st.forward(x, runs, pool)
            for g in st.exits:
                out.setdefault(g, []).append(torch.stack([torch.as_tensor(so.logits[g]) for so in o.seqs]))
            li = st.log_index(n_seg - 1)
            if li is not None:
                x = pool.logs[li, :, a:b].reshape(B * (b - a), -1)
    return {g: torch.cat(v, dim=1) for g, v in out.items()}


@pytest.fixture
def run_chain():
    return _run_chain


# prefill of 5, three single-token decode steps, then a chunk of 4
CHUNKS = [(0, 5), (5, 6), (6, 7), (7, 8), (8, 12)]


@pytest.fixture
def chunks():
    return CHUNKS
