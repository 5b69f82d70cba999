"""Exit adaptation of a 1B-class imported model on one GPU: tokens/s, peak memory, per-exit loss before/after.

The model is a `LlamaForCausalLM` in TinyLlama-1.1B's shape (d 2048, 22 layers, 32/4 heads, d_ff 5632,
vocab 32000) with RANDOM weights: no pretrained weights are reachable offline, so the trunk is random
and what the exits learn is the data's statistics through random features. It takes the user's path:
`save_pretrained` with a byte-level BPE tokenizer trained here -> `import_hf(--exits 6,11,16
--branch-layers 1 --exit-unembed own)` -> `prepare(--tokenizer FAMILY)` on Python source text (the torch
package's own .py files: real text, no download) -> the trainer with `--init FAMILY --train exits`
(cross-entropy; then CE + KL distillation to the final exit), and a few steps of `--train all` for
contrast (its optimizer state covers the whole model).

    PYTHONPATH=. python3 benchmarks/adapt_exits.py --out "$OUT"            # H200: about 3 minutes
    PYTHONPATH=. python3 benchmarks/adapt_exits.py --out /tmp/a --quick    # CPU smoke test, tiny shape

Writes adapt_exits.json, adapt_exits.png and adapt_exits.log into --out and prints a table last.
tokens/s = tokens trained / the trainer's loop seconds (data loading and its one final evaluation
included; the step-0 evaluation is not).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SHAPE_QUICK = dict(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    LOG.append(line)
    print(line, flush=True)


def corpus_files(limit_bytes: int) -> list[Path]:
    """The torch package's .py files, in a fixed order, up to `limit_bytes` of text."""
    root = Path(torch.__file__).parent
    out, total = [], 0
    for f in sorted(root.rglob("*.py")):
        n = f.stat().st_size
        if n < 2000:
            continue
        out.append(f)
        total += n
        if total >= limit_bytes:
            break
    return out


def write_hf_model(d: Path, shape: dict, files: list[Path], device: str) -> dict:
    """A byte-level BPE tokenizer trained on the corpus and a random Llama of `shape`, saved like a hub model."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    hf_tok.save_pretrained(d)
    tok_s = time.time() - t0
    t0 = time.time()
    cfg = transformers.LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B init on the GPU takes seconds, on the CPU minutes
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"tokenizer_train_s": round(tok_s, 1), "model_write_s": round(time.time() - t0, 1),
            "hf_params": n, "tokenizer_vocab": len(hf_tok)}


def run_train(name: str, fam: Path, data: Path, out: Path, args, **kw) -> dict:
    from trunk.adapt import init_config
    from trunk.train import TrainConfig, train

    t = TrainConfig(data=str(data), out=str(out), seq_len=args.seq_len, batch_size=args.batch_size,
                    lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, kw["steps"] // 10), eval_every=0,
                    eval_batches=args.eval_batches, log_every=10, progress=False, save_dtype="bfloat16",
                    init=str(fam), **kw)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rec = train(init_config(fam), t)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    curve = [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    res = {"name": name, "train": kw.get("train", "all"), "steps": rec["steps"], "tokens": rec["D"],
           "loop_s": rec["train_seconds"], "wall_s": round(wall, 1), "tokens_per_s": round(rec["D"] / rec["train_seconds"]),
           "peak_mem_gib": None if peak is None else round(peak, 2),
           "exit_val_loss_before": rec["exit_val_loss_before"], "exit_val_loss_after": rec["exit_val_loss"],
           "adaptation": rec["adaptation"], "train_loss_curve": curve}
    a = rec["adaptation"]
    res["adamw_state_gib"] = round(a["trainable_params"] * 8 / 2**30, 2)  # fp32 exp_avg + exp_avg_sq
    log(f"{name}: {rec['steps']} steps, {res['tokens_per_s']} tok/s, peak {res['peak_mem_gib']} GiB, "
        f"val {[round(x, 3) for x in rec['exit_val_loss_before']]} -> {[round(x, 3) for x in rec['exit_val_loss']]}")
    shutil.rmtree(out, ignore_errors=True)  # trainer state of a 1B model: gigabytes we do not need
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    adapt_runs = [r for r in runs if r["train"] == "exits"]
    G = len(adapt_runs[0]["exit_val_loss_before"])
    width = 0.8 / (len(adapt_runs) + 1)
    xs = range(G)
    a1.bar([x - 0.4 + width / 2 for x in xs], adapt_runs[0]["exit_val_loss_before"], width, label="before")
    for i, r in enumerate(adapt_runs, 1):
        a1.bar([x - 0.4 + width / 2 + i * width for x in xs], r["exit_val_loss_after"], width, label=f"after: {r['name']}")
    a1.set_xticks(list(xs), [f"exit {g}" + (" (final, frozen)" if g == G - 1 else "") for g in xs])
    vals = [v for r in adapt_runs for v in r["exit_val_loss_before"] + r["exit_val_loss_after"]]
    a1.set_ylim(min(vals) - 0.5, max(vals) + 0.3)  # the differences, not the distance from zero
    a1.set_ylabel("validation CE (nats/token)")
    a1.legend(loc="lower left", fontsize=8)
    for r in adapt_runs:
        s, l_ = zip(*r["train_loss_curve"])
        a2.plot(s, l_, label=r["name"])
    a2.set_xlabel("step")
    a2.set_ylabel("training objective")
    a2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for adapt_exits.json/.png/.log")
    p.add_argument("--quick", action="store_true", help="tiny shape on CPU (smoke test of the script)")
    p.add_argument("--steps", type=int, default=300, help="steps of --train exits (cross-entropy)")
    p.add_argument("--distill-steps", type=int, default=150, help="steps of --train exits --distill 0.5")
    p.add_argument("--all-steps", type=int, default=10, help="steps of --train all (contrast)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--corpus-mb", type=float, default=6.0, help="MB of torch's .py files to tokenize")
    args = p.parse_args()
    if args.quick:
        args.steps, args.distill_steps, args.all_steps = min(args.steps, 20), min(args.distill_steps, 10), 3
        args.seq_len, args.batch_size, args.eval_batches, args.corpus_mb, args.lr = 64, 4, 2, 0.4, 3e-3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    shape, exits = (SHAPE_QUICK, [2, 3, 4]) if args.quick else (SHAPE_1B, [6, 11, 16])
    # the checkpoints and trainer states of a 1B model are tens of GB: /dev/shm when it is that large
    # (containers often give it 64 MB), else the default temporary directory
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > 48 * 2**30
    work = Path(tempfile.mkdtemp(prefix="familial-adapt-", dir=shm if roomy else None))
    t_start = time.time()
    try:
        from trunk.data import prepare
        from trunk.hf import import_hf

        files = corpus_files(int(args.corpus_mb * 2**20))
        log(f"corpus: {len(files)} files of {Path(torch.__file__).parent}, {sum(f.stat().st_size for f in files) / 2**20:.1f} MB")
        made = write_hf_model(work / "hf", shape, files, device)
        log(f"HF model: {made['hf_params'] / 1e9:.3f}B params (random), tokenizer vocab {made['tokenizer_vocab']} "
            f"({made['tokenizer_train_s']} s), written in {made['model_write_s']} s")
        t0 = time.time()
        imp = import_hf(work / "hf", work / "fam", exits, branch_layers=1, exit_unembed="own")
        import_s = round(time.time() - t0, 1)
        log(f"import-hf: {imp['params'] / 1e9:.3f}B params with exits at {list(imp['config'].exits)}, {import_s} s")
        t0 = time.time()
        idx = prepare([str(f) for f in files], work / "data", tokenizer=str(work / "fam"), val_fraction=0.05,
                      progress=False)
        log(f"prepare: {idx['splits']['train']['tokens']} train + {idx['splits']['val']['tokens']} val tokens, "
            f"{time.time() - t0:.1f} s")
        runs = [run_train("exits (CE)", work / "fam", work / "data", work / "r1", args, steps=args.steps, train="exits"),
                run_train("exits (CE + KL, a=0.5, T=2)", work / "fam", work / "data", work / "r2", args,
                          steps=args.distill_steps, train="exits", distill=0.5, distill_temp=2.0),
                run_train("all (contrast)", work / "fam", work / "data", work / "r3", args, steps=args.all_steps,
                          train="all")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = {
        "what": "exit adaptation of an imported Llama with RANDOM weights (no pretrained weights offline)",
        "device": dev_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "shape": shape, "exits": exits, "branch_layers": 1, "exit_unembed": "own",
        "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr, "corpus_files": len(files),
        "hf_model": made, "import_s": import_s, "family_params": imp["params"], "runs": runs,
        "total_wall_s": round(time.time() - t_start, 1),
    }
    (out / "adapt_exits.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out / "adapt_exits.png", f"exit adaptation, {shape['num_hidden_layers']}-layer Llama shape "
                                        f"(random weights), exits {exits}+1 branch layer, {dev_name}")
    (out / "adapt_exits.log").write_text("\n".join(LOG) + "\n")
    print(f"\n{'run':<30} {'steps':>5} {'tok/s':>9} {'peak GiB':>9} {'AdamW GiB':>9}  per-exit val loss before -> after")
    for r in runs:
        b = " ".join(f"{x:.3f}" for x in r["exit_val_loss_before"])
        a = " ".join(f"{x:.3f}" for x in r["exit_val_loss_after"])
        print(f"{r['name']:<30} {r['steps']:>5} {r['tokens_per_s']:>9} {str(r['peak_mem_gib']):>9} "
              f"{r['adamw_state_gib']:>9}  {b} -> {a}")
    print(f"total {result['total_wall_s']} s on {dev_name}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
