"""IsoFLOP sweeps, part 1: the sweep file and the plan (every run's model and trainer config).

A sweep file (YAML or JSON) names compute budgets C, model sizes (target non-embedding N, or multiples of
a law's compute-optimal N_opt), the numbers of exits G with their placements, dense baselines, data and
seeds; `examples/sweep.yaml` shows every key with its meaning. From it `plan_sweep` makes one `RunSpec`
per run:
- shapes come from the width/depth rule (`trunk/shape_rule.py`), one shape per size for every G;
- D = C / flops_per_token (trunk.flops' full count: matmuls, attention, every exit head), rounded up to
  whole optimizer steps; the global batch is D / (target_steps * seq_len) rounded to a power of two and
  clamped, so short runs still take enough steps; warmup, evaluation and save points are fractions of
  the run's steps (a fixed 50-step warmup would swallow a 40-step run);
- dense baselines (for the branch law's L_dense): for every exit of every family, a dense model of
  that exit's depth and the family's width, trained on the same compute C ("same_compute", the
  paper's "matched parameter count and compute") or on the family's own D tokens ("same_D").
  A baseline equal to another run (the G = 1 run is the final exit's same-compute baseline) is
  planned once: runs are keyed by a hash of their model, trainer settings and data.
N_opt of a law {A, alpha, B, beta} is the ladder shape minimising A / N^alpha + B / D^beta at
D = C / flops_per_token, i.e. under the same full FLOP count the runs use.

This file plans; it does not train (`trunk/sweep_runner.py` runs a plan, `trunk/sweep_cli.py` is the
command line).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from trunk.config import ConfigError, FamilyConfig
from trunk.data import DataError, read_index
from trunk.flops import flops_per_token, param_counts
from trunk.shape_rule import ShapeRule, dense_shape, exit_layers, ladder, nearest_shape, uniform_fractions
from trunk.train import TrainConfig

DENSE_MODES = ("same_compute", "same_D", "off")
# TrainConfig fields the sweep sets itself (per run) or that make no sense in a sweep.
_SWEEP_SET = {"data", "out", "steps", "tokens", "flops", "seq_len", "batch_size", "grad_accum", "lr", "min_lr",
              "warmup_steps", "eval_every", "eval_batches", "log_every", "save_every", "seed", "resume",
              "stop_at", "run_record", "threads", "progress"}
# Fields left out of a run's key: where it writes and how it shows progress do not change its result.
_NOT_IN_KEY = {"out", "run_record", "resume", "progress", "threads", "compile", "compile_blocks", "cuda_graph",
               "device", "stop_at"}


class SweepError(ValueError):
    """A sweep file or plan that cannot run; one line naming the file and key."""


@dataclass
class SizeSpec:
    N: list = field(default_factory=list)                # explicit target N (non-embedding), or
    n_opt_multiples: list = field(default_factory=list)  # multiples of the law's N_opt at each budget
    law: dict = field(default_factory=dict)              # {A, alpha, B, beta}: the law that gives N_opt
    law_source: str = ""                                 # where the law came from (file or "inline")


@dataclass
class TrainRule:
    seq_len: int = 256          # tokens per training sequence
    lr: float = 3e-3            # peak learning rate
    min_lr_frac: float = 0.1    # final learning rate as a fraction of lr
    warmup_frac: float = 0.05   # linear warmup as a fraction of the run's steps (at least 1 step)
    target_steps: int = 1000    # global batch ~ D / (target_steps * seq_len), then a power of two, clamped
    min_batch: int = 8          # smallest global batch (sequences, a power of two)
    max_batch: int = 512        # largest global batch (sequences, a power of two)
    micro_batch: int = 256      # most sequences per forward pass per process (power of two); more = accumulate
    eval_sequences: int = 256   # validation set: the same fixed windows for every run (multiple of micro_batch)
    eval_points: int = 1        # validation evaluations per run, the last at the end
    save_points: int = 4        # checkpoints + trainer state per run (resume points after a kill)
    threads: int = 0            # torch CPU threads per run (0 = torch's default; 1 with several CPU jobs)
    fields: dict = field(default_factory=dict)  # any other TrainConfig field (dtype, compile, weight_decay, ...)


@dataclass
class Estimate:
    flops_per_s: float = 0.0    # achieved FLOP/s per run before any run is measured (0 = 2e13 CUDA, 2e9 CPU)
    overhead_s: float = 5.0     # start-up, compilation and evaluation seconds per run


@dataclass
class SweepConfig:
    out: str
    data: str
    budgets: list
    sizes: SizeSpec
    G: list
    exits: dict                 # G -> fractions of depth of its shallow exits
    dense_baselines: str = "same_compute"
    seeds: list = field(default_factory=lambda: [0])
    shape: ShapeRule = field(default_factory=ShapeRule)
    train: TrainRule = field(default_factory=TrainRule)
    estimate: Estimate = field(default_factory=Estimate)
    vocab_size: int = 0         # 0 = the data's vocabulary
    source: str = ""            # the sweep file


# ---- reading the sweep file ---------------------------------------------------------------------

_TOP = {"out", "data", "budgets", "sizes", "G", "exits", "dense_baselines", "seeds", "shape", "train",
        "estimate", "vocab_size"}


def _num(v, where: str, kind=float):
    """YAML reads 1e15 (no dot) as a string; accept any number written as text."""
    try:
        x = kind(float(v)) if kind is int else float(v)
        if kind is int and float(v) != x:
            raise ValueError
    except (TypeError, ValueError):
        raise SweepError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
    if not math.isfinite(x):
        raise SweepError(f"{where} must be finite, got {v!r}")
    return x


def _nums(v, where: str, kind=float, positive=True) -> list:
    if not isinstance(v, (list, tuple)) or not v:
        raise SweepError(f"{where} must be a non-empty list")
    out = [_num(x, f"{where}[{i}]", kind) for i, x in enumerate(v)]
    if positive and any(x <= 0 for x in out):
        raise SweepError(f"{where} must hold positive numbers, got {v}")
    return out


def _section(doc: dict, name: str, cls, where: str, convert=None):
    raw = doc.get(name, {}) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: '{name}' must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    vals = {}
    for k, v in raw.items():
        if k not in known or k in ("fields", "extra", "law_source"):
            if convert is not None and convert(k, v, vals):
                continue
            raise SweepError(f"{where}: unknown key '{name}.{k}' (known: {', '.join(sorted(set(known) - {'fields', 'extra', 'law_source'}))})")
        default = known[k].default
        if isinstance(default, bool) or default is None:
            vals[k] = v
        elif isinstance(default, int):
            vals[k] = _num(v, f"{name}.{k}", int)
        elif isinstance(default, float):
            vals[k] = _num(v, f"{name}.{k}")
        else:
            vals[k] = v
    return cls(**vals)


def _train_rule(doc: dict, where: str) -> TrainRule:
    tc = {f.name for f in dataclasses.fields(TrainConfig)}

    def passthrough(k, v, vals):  # other TrainConfig fields ride along, with the type of their default
        if k in tc and k not in _SWEEP_SET:
            default = getattr(TrainConfig(), k)
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                if not isinstance(v, type(default)):
                    raise SweepError(f"{where}: train.{k} must be a {type(default).__name__}, got {v!r}")
            else:
                v = _num(v, f"train.{k}", int if isinstance(default, int) else float)
            vals.setdefault("fields", {})[k] = v
            return True
        if k in _SWEEP_SET and k in tc:
            raise SweepError(f"{where}: 'train.{k}' is set by the sweep for each run; use the sweep's rule keys "
                             f"(warmup_frac, target_steps, micro_batch, eval_sequences, ...)")
        return False
    rule = _section(doc, "train", TrainRule, where, passthrough)
    for k in ("seq_len", "target_steps", "min_batch", "max_batch", "micro_batch", "eval_sequences", "eval_points"):
        if getattr(rule, k) <= 0:
            raise SweepError(f"{where}: train.{k} must be positive, got {getattr(rule, k)}")
    for k in ("min_batch", "max_batch", "micro_batch"):
        v = getattr(rule, k)
        if v & (v - 1):
            raise SweepError(f"{where}: train.{k} must be a power of two, got {v}")
    if rule.min_batch > rule.max_batch:
        raise SweepError(f"{where}: train.min_batch ({rule.min_batch}) exceeds train.max_batch ({rule.max_batch})")
    if rule.eval_sequences % rule.micro_batch:
        raise SweepError(f"{where}: train.eval_sequences ({rule.eval_sequences}) must be a multiple of "
                         f"train.micro_batch ({rule.micro_batch}) so every run sees the same validation windows")
    if not (0 <= rule.warmup_frac < 1 and 0 <= rule.min_lr_frac <= 1 and rule.lr > 0 and rule.save_points >= 0):
        raise SweepError(f"{where}: need 0 <= train.warmup_frac < 1, 0 <= train.min_lr_frac <= 1, train.lr > 0, "
                         f"train.save_points >= 0")
    dtype = rule.fields.get("dtype", "auto")
    if dtype not in ("auto", "bfloat16", "float32"):
        raise SweepError(f"{where}: train.dtype must be auto, bfloat16 or float32, got {dtype!r}")
    return rule


_RULE_SETS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "exit_layers"}


def _model_passthrough(k, v, vals) -> bool:
    """Other FamilyConfig fields (qkv_bias, rope_theta, tie_embeddings, ...) ride along in shape.extra."""
    if k in {f.name for f in dataclasses.fields(FamilyConfig)} - _RULE_SETS:
        vals.setdefault("extra", {})[k] = v
        return True
    return False


def _law(v, where: str, base: Path) -> tuple[dict, str]:
    if isinstance(v, str):  # a familial-fit --json result
        p = (base / v) if not Path(v).is_absolute() else Path(v)
        try:
            params = json.loads(p.read_text())["params"]
        except (OSError, ValueError, KeyError, TypeError):
            raise SweepError(f"{where}: sizes.law {v!r} is not a readable familial-fit --json file with 'params'") from None
        src = str(p)
    elif isinstance(v, dict):
        params, src = v, "inline"
    else:
        raise SweepError(f"{where}: sizes.law must be a mapping {{A, alpha, B, beta}} or a familial-fit JSON path")
    try:
        law = {k: float(params[k]) for k in ("A", "alpha", "B", "beta")}
    except (KeyError, TypeError, ValueError):
        raise SweepError(f"{where}: sizes.law needs numbers A, alpha, B and beta") from None
    if not all(x > 0 and math.isfinite(x) for x in law.values()):
        raise SweepError(f"{where}: sizes.law's A, alpha, B, beta must be positive, got {law}")
    return law, src


def _sizes(doc: dict, where: str, base: Path) -> SizeSpec:
    raw = doc.get("sizes")
    if isinstance(raw, list):
        return SizeSpec(N=_nums(raw, "sizes"))
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: 'sizes' must be a list of target N or a mapping with N_opt multiples and a law")
    unknown = set(raw) - {"N", "n_opt_multiples", "law"}
    if unknown:
        raise SweepError(f"{where}: unknown key 'sizes.{sorted(unknown)[0]}' (known: N, n_opt_multiples, law)")
    if ("N" in raw) == ("n_opt_multiples" in raw):
        raise SweepError(f"{where}: give exactly one of sizes.N and sizes.n_opt_multiples")
    if "N" in raw:
        return SizeSpec(N=_nums(raw["N"], "sizes.N"))
    if "law" not in raw:
        raise SweepError(f"{where}: sizes.n_opt_multiples needs sizes.law")
    law, src = _law(raw["law"], where, base)
    return SizeSpec(n_opt_multiples=_nums(raw["n_opt_multiples"], "sizes.n_opt_multiples"), law=law, law_source=src)


def _exits(doc: dict, Gs: list[int], where: str) -> dict:
    raw = doc.get("exits", "uniform")
    table = {G: uniform_fractions(G) for G in Gs}
    if raw == "uniform":
        return table
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: 'exits' must be 'uniform' or a mapping G -> list of depth fractions")
    for k, v in raw.items():
        G = int(_num(k, "exits key", int))
        fr = _nums(v, f"exits[{G}]") if v else []
        if len(fr) != G - 1 or any(not 0 < f < 1 for f in fr) or fr != sorted(set(fr)):
            raise SweepError(f"{where}: exits[{G}] must be {G - 1} increasing fractions in (0, 1), got {v}")
        table[G] = fr
    return table


def parse_sweep(doc, source: str = "<sweep>", base: Path | None = None) -> SweepConfig:
    where = source
    if not isinstance(doc, dict):
        raise SweepError(f"{where}: a sweep file must be a mapping")
    unknown = sorted(set(doc) - _TOP)
    if unknown:
        raise SweepError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_TOP))})")
    for k in ("out", "data", "budgets", "sizes", "G"):
        if k not in doc:
            raise SweepError(f"{where}: missing key '{k}'")
    base = base or Path(".")
    Gs = [int(g) for g in _nums(doc["G"], "G", int)]
    dense = doc.get("dense_baselines", "same_compute")
    if dense is False:
        dense = "off"
    if dense not in DENSE_MODES:
        raise SweepError(f"{where}: dense_baselines must be one of {', '.join(DENSE_MODES)}, got {dense!r}")
    try:
        shape = _section(doc, "shape", ShapeRule, where, _model_passthrough)
        shape.validate()
    except (ConfigError, TypeError) as e:
        raise SweepError(f"{where}: {e}") from None
    cfg = SweepConfig(
        out=str(doc["out"]), data=str(doc["data"]), budgets=_nums(doc["budgets"], "budgets"),
        sizes=_sizes(doc, where, base), G=Gs, exits=_exits(doc, Gs, where), dense_baselines=dense,
        seeds=[int(s) for s in _nums(doc.get("seeds", [0]), "seeds", int, positive=False)],
        shape=shape, train=_train_rule(doc, where), estimate=_section(doc, "estimate", Estimate, where),
        vocab_size=int(_num(doc.get("vocab_size", 0), "vocab_size", int)), source=source)
    return cfg


def load_sweep(path: str) -> SweepConfig:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean "unparseable"
        raise SweepError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    return parse_sweep(doc, str(path), p.parent)


# ---- the plan ------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    name: str                   # readable: budget, shape, G, seed
    key: str                    # hash of model + trainer settings + data: the run's identity
    role: str                   # "grid" (an IsoFLOP point) or "dense" (a dense baseline only)
    budget: float               # C of the grid cell (same_D baselines: their family's C)
    seed: int
    size_index: int             # position of its size in the budget's size list
    target_N: float
    model: dict                 # FamilyConfig.to_dict()
    train: dict                 # TrainConfig fields, except data/out (set when it runs)
    N: int                      # non-embedding parameters
    N_total: int
    flops_per_token: float
    steps: int
    tokens: int                 # D = steps * global batch * seq_len
    dense_for_exits: list = field(default_factory=list)  # keys of the dense baseline of each exit (G > 1)
    epochs: float = float("nan")  # D / training tokens in the data

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def G(self) -> int:
        return len(self.model["exit_layers"]) + 1


@dataclass
class SweepPlan:
    config: SweepConfig
    runs: list                  # RunSpec, in run order
    data: dict                  # {"fingerprint", "train_tokens", "val_tokens", "vocab_size"}
    n_opt: dict                 # budget -> (N_opt, shape name) when sizes come from a law
    notes: list                 # one-line remarks (sizes merged on the ladder, small val set)
    world: int = 1              # processes per run


def _pow2_near(x: float) -> int:
    return 1 << max(0, int(round(math.log2(max(x, 1.0)))))


def data_summary(path: str) -> dict:
    """Vocabulary, token counts and a content fingerprint (shards + tokenizer) of a prepared data folder."""
    index = read_index(path)
    h = hashlib.sha256()
    d = Path(path)
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            with open(d / shard["file"], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    for name in index["tokenizer"]["files"]:
        if (d / name).is_file():
            h.update((d / name).read_bytes())
    return {"fingerprint": h.hexdigest()[:16], "train_tokens": int(index["splits"]["train"]["tokens"]),
            "val_tokens": int(index["splits"]["val"]["tokens"]), "vocab_size": int(index["vocab_size"])}


def _train_fields(cfg: SweepConfig, fpt: float, *, C: float = 0.0, steps: int = 0, batch: int = 0,
                  seed: int, world: int) -> dict:
    """TrainConfig fields of one run: a budget C (steps from D = C / fpt) or fixed steps and batch."""
    r = cfg.train
    T = r.seq_len
    if not steps:
        D = C / fpt
        batch = min(r.max_batch, max(r.min_batch, _pow2_near(D / (r.target_steps * T))))
        batch = max(batch, world)
        steps = max(1, math.ceil(D / (batch * T)))
    micro = min(r.micro_batch, max(1, batch // world))
    if batch % (micro * world):
        raise SweepError(f"global batch {batch} is not a multiple of micro_batch x processes ({micro} x {world})")
    every = lambda k: 0 if k <= 1 else max(1, math.ceil(steps / k))
    t = {**r.fields, "seq_len": T, "batch_size": micro, "grad_accum": batch // (micro * world), "steps": steps,
         "lr": r.lr, "min_lr": r.lr * r.min_lr_frac, "warmup_steps": max(1, round(r.warmup_frac * steps)),
         "eval_every": every(r.eval_points), "eval_batches": max(1, r.eval_sequences // (micro * world)),
         "log_every": max(1, steps // 100), "save_every": every(r.save_points) if r.save_points else 0,
         "seed": seed, "threads": r.threads}
    return t


def run_key(model: dict, train: dict, fingerprint: str) -> str:
    body = {"model": model, "train": {k: v for k, v in sorted(train.items()) if k not in _NOT_IN_KEY},
            "data": fingerprint}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]


def _cstr(C: float) -> str:
    m, e = f"{C:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def _n_opt(C: float, law: dict, shapes: list[FamilyConfig], T: int) -> FamilyConfig:
    def loss(c):
        N = param_counts(c).non_embedding
        D = C / flops_per_token(c, T)
        return law["A"] * N ** -law["alpha"] + law["B"] * D ** -law["beta"]
    return min(shapes, key=loss)


def _sizes_for(cfg: SweepConfig, C: float, shapes, notes: list, n_opt: dict) -> list[tuple[float, FamilyConfig]]:
    T = cfg.train.seq_len
    if cfg.sizes.N:
        targets = list(cfg.sizes.N)
    else:
        best = _n_opt(C, cfg.sizes.law, shapes, T)
        N0 = param_counts(best).non_embedding
        n_opt[C] = (N0, f"d{best.d_model}-L{best.n_layers}")
        targets = [m * N0 for m in cfg.sizes.n_opt_multiples]
    out, seen = [], set()
    for t in targets:
        s = nearest_shape(t, shapes, cfg.shape)
        if (s.d_model, s.n_layers) in seen:
            notes.append(f"C={_cstr(C)}: target N {t:.3g} falls on the same ladder shape d{s.d_model}-L{s.n_layers} "
                         f"as a smaller target; planned once")
            continue
        seen.add((s.d_model, s.n_layers))
        out.append((t, s))
    return out


class _Planner:
    """Collects runs for a plan, keyed so that identical runs are planned once."""

    def __init__(self, cfg: SweepConfig, data: dict, world: int):
        self.cfg, self.data, self.world = cfg, data, world
        self.runs: dict[str, RunSpec] = {}

    def add(self, model: FamilyConfig, role: str, C: float, seed: int, idx: int, target: float, *,
            steps: int = 0, batch: int = 0) -> RunSpec:
        T = self.cfg.train.seq_len
        fpt = flops_per_token(model, T)
        train = _train_fields(self.cfg, fpt, C=C, steps=steps, batch=batch, seed=seed, world=self.world)
        m = model.to_dict()
        key = run_key(m, train, self.data["fingerprint"])
        if key in self.runs:
            return self.runs[key]
        pc = param_counts(model)
        gb = train["batch_size"] * train["grad_accum"] * self.world
        tokens = train["steps"] * gb * T
        ex = "" if not model.exit_layers else "-x" + ".".join(map(str, model.exit_layers))
        budget = _cstr(C) if not steps else f"D{tokens:.3g}".replace("+", "")
        name = f"{budget}-d{model.d_model}-L{model.n_layers}-G{model.G}{ex}-s{seed}"
        epochs = tokens / self.data["train_tokens"] if self.data.get("train_tokens") else float("nan")
        spec = RunSpec(name=name, key=key, role=role, budget=C, seed=seed, size_index=idx, target_N=target,
                       model=m, train=train, N=pc.non_embedding, N_total=pc.total, flops_per_token=fpt,
                       steps=train["steps"], tokens=tokens, epochs=epochs)
        self.runs[key] = spec
        return spec


def _baselines(pl: _Planner, fam: RunSpec, shape: FamilyConfig, C: float, seed: int, idx: int, target: float,
               mode: str) -> list[str]:
    """The dense baseline of each exit of `fam` (same width, the exit's depth), planned in `pl`."""
    keys = []
    gb = fam.train["batch_size"] * fam.train["grad_accum"] * pl.world
    for depth in list(fam.model["exit_layers"]) + [fam.model["n_layers"]]:
        dense = dense_shape(shape.d_model, depth, pl.cfg.shape, shape.vocab_size, shape.max_seq_len)
        if mode == "same_compute":
            spec = pl.add(dense, "dense", C, seed, idx, target)
        else:  # same_D: the family's steps and batch, so exactly its D tokens
            spec = pl.add(dense, "dense", C, seed, idx, target, steps=fam.steps, batch=gb)
        keys.append(spec.key)
    return keys


def plan_sweep(cfg: SweepConfig, data: dict | None = None, world: int = 1) -> SweepPlan:
    """Every run of the sweep, budgets ascending; within a budget dense runs first, then families."""
    if data is None:
        try:
            data = data_summary(cfg.data)
        except DataError as e:
            if not cfg.vocab_size:
                raise SweepError(f"{e} (or set vocab_size in the sweep file to plan without data)") from None
            data = {"fingerprint": "no-data", "train_tokens": 0, "val_tokens": 0, "vocab_size": cfg.vocab_size}
    vocab = cfg.vocab_size or data["vocab_size"]
    if vocab < data["vocab_size"]:
        raise SweepError(f"vocab_size {vocab} is smaller than the data's vocabulary {data['vocab_size']}")
    if cfg.train.eval_sequences % (cfg.train.micro_batch * world):
        raise SweepError(f"train.eval_sequences ({cfg.train.eval_sequences}) must be a multiple of micro_batch x "
                         f"processes per run ({cfg.train.micro_batch} x {world})")
    try:
        shapes = ladder(cfg.shape, vocab, cfg.train.seq_len)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    pl, notes, n_opt = _Planner(cfg, {**data, "vocab_size": vocab}, world), [], {}
    for C in sorted(cfg.budgets):
        for idx, (target, shape) in enumerate(_sizes_for(cfg, C, shapes, notes, n_opt)):
            for seed in cfg.seeds:
                for G in sorted(cfg.G):
                    try:
                        model = shape.replace(exit_layers=exit_layers(shape.n_layers, cfg.exits[G]))
                    except ConfigError as e:
                        raise SweepError(f"d{shape.d_model}-L{shape.n_layers}: {e}") from None
                    fam = pl.add(model, "grid", C, seed, idx, target)
                    fam.role = "grid"  # a run planned first as a baseline is also a grid point
                    if G > 1 and cfg.dense_baselines != "off":
                        fam.dense_for_exits = _baselines(pl, fam, shape, C, seed, idx, target, cfg.dense_baselines)
    runs = sorted(pl.runs.values(), key=lambda r: (r.budget, r.G > 1, r.N, r.G, r.seed))
    if data.get("val_tokens") and cfg.train.eval_sequences * (cfg.train.seq_len + 1) > data["val_tokens"]:
        notes.append(f"the validation split holds {data['val_tokens']} tokens, fewer than eval_sequences x "
                     f"(seq_len+1) = {cfg.train.eval_sequences * (cfg.train.seq_len + 1)}: windows repeat")
    return SweepPlan(cfg, runs, {**data, "vocab_size": vocab}, n_opt, notes, world)
