"""The committed built-in family: loads, is small, has 3+ exits ordered by quality, and predicts Python."""
import math

import torch
import torch.nn.functional as F

from trunk import builtin_path
from trunk.checkpoint import load_checkpoint

SNIPPET = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, n=1):
        self.count += n
        return self.count
'''


def test_builtin_family_loads_and_is_small():
    d = builtin_path()
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert size <= 10 * 2**20, size
    model, tok, meta = load_checkpoint(d)
    assert model.cfg.G >= 3 and meta["dtype"] == "float16"
    val = [e["val_loss"] for e in meta["exits"]]
    assert all(v is not None for v in val)
    assert val[-1] < val[0]  # the deepest exit beats the shallowest on held-out stdlib code
    # on unseen Python, every exit is far better than uniform over the vocabulary
    ids = torch.tensor(tok.encode(SNIPPET))[None]
    logits = model(ids[:, :-1])
    ce = [F.cross_entropy(l[0].float(), ids[0, 1:]).item() for l in logits]
    assert all(c < math.log(tok.vocab_size) - 2 for c in ce), ce
    assert ce[-1] < ce[0], ce
