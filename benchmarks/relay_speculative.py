"""Relay speculative decoding: per-request tokens/s of the target exit, speculative vs not, at injected
round trips between the device tier and the deeper tiers.

The built-in family (trunk/builtin: exits after layers 2, 4, 6), or the family --checkpoint names, is
split by --tiers (default device = exit 0, edge = exit 1, cloud = exit 2) and served by three real
relay nodes over gRPC loopback in this process (`relay.cli.start_node`), on --device. The device ->
edge hop gets a round trip of RTT ms per step message
(`tests.hop_delay`: the harness wraps the head engine's downstream; no production flag). Each
request is batch-1 greedy, `ignore_eos`; prompts are the openings of Python files (what the built-in
family was trained on) or windows of a prepared corpus' held-out split (--prompt-data), and every
mode's tokens are checked equal to plain decoding at the final exit.

Modes: `plain` (one target step, one round trip per token), `spec` (draft exit 0 on the device,
verify at the final exit, k adaptive with a cap of --k), `spec-k<N>` (fixed k = N).

Reported per (mode, RTT): decode tokens/s per request (tokens after the first / time from the first to
the last token; mean over requests), end-to-end tokens/s, acceptance rate (accepted / drafted), mean
tokens per round (accepted + 1), rounds, and the speedup over plain. Writes
results/relay_speculative_<tag>.json and .png under --out.

    python3 benchmarks/relay_speculative.py --quick            # 2-core CPU, < 3 min
    python3 benchmarks/relay_speculative.py --out "$OUT"       # more prompts and tokens
    python3 benchmarks/relay_speculative.py --checkpoint runs/fam --prompt-data data --device cuda \
        --tiers device=0..1,edge=2,cloud=3.. --out "$OUT"     # a trained family on the GPU
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.cli import start_node  # noqa: E402
from relay.client import RelayClient  # noqa: E402
from relay.work import GenRequest, Speculative  # noqa: E402
from tests.hop_delay import delay_hop  # noqa: E402

TARGET_SPEEDUP_AT_40MS = 2.5   # the target, speculative over plain decode tokens/s


def prompts(tok, n: int, length: int) -> list[list[int]]:
    """Openings of standard-library Python files, `length` tokens each."""
    import os
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in ["textwrap.py", "json/encoder.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py",
                 "fnmatch.py", "colorsys.py", "glob.py", "queue.py"]:
        p = lib / name
        if p.is_file():
            ids = tok.encode(p.read_text(errors="replace")[:4000])
            if len(ids) >= length:
                out.append(ids[:length])
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"no prompt files found under {lib} ({os.listdir(lib)[:5]}...)")
    return out


async def run_mode(client, mode: str, k: int, prompts_: list[list[int]], n_tokens: int, G: int) -> dict:
    st = client.generate_stream()
    per, e2e, toks_all = [], [], []
    drafted = accepted = rounds = 0
    for i, p in enumerate(prompts_):
        spec = None
        if mode == "spec":
            spec = Speculative(None, k, adaptive=True)
        elif mode.startswith("spec-k"):
            spec = Speculative(None, int(mode[6:]), adaptive=False)
        req = GenRequest(f"{mode}-{i}-{time.monotonic_ns()}", p, n_tokens, exit=G - 1, ignore_eos=True,
                         speculative=spec)
        t0, first, evs = time.perf_counter(), None, []
        async for ev in st.submit(req):
            if ev.error:
                raise RuntimeError(ev.error)
            if first is None:
                first = time.perf_counter()
            evs.append(ev)
        t1 = time.perf_counter()
        if any(e.degraded for e in evs):
            raise RuntimeError(f"{mode}: degraded tokens: {evs[-1].reason}")
        per.append((len(evs) - 1) / max(1e-9, t1 - first))
        e2e.append(len(evs) / (t1 - t0))
        toks_all.append([e.token for e in evs])
        drafted += sum(e.drafted for e in evs)
        accepted += sum(e.accepted for e in evs)
        rounds += sum(1 for e in evs if e.drafted)
    await st.close()
    return {"decode_tok_s": sum(per) / len(per), "e2e_tok_s": sum(e2e) / len(e2e), "per_request_decode_tok_s": per,
            "drafted": drafted, "accepted": accepted, "rounds": rounds,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_round": (accepted + rounds) / rounds if rounds else None, "tokens": toks_all}


async def bench(args) -> dict:
    from deploy.shards import load_tier, split_checkpoint
    from trunk.checkpoint import load_checkpoint
    from trunk.tokenizer import load_tokenizer

    torch.set_num_threads(max(1, args.threads))
    ckpt = Path(args.checkpoint)
    tok = load_tokenizer(ckpt)
    model, _, meta = load_checkpoint(ckpt)
    G = model.cfg.G
    if args.prompt_data:
        from trunk.data import TokenData
        ps = TokenData(args.prompt_data, args.prompt_len).val_batch(0, args.prompts, 1)[:, :args.prompt_len].tolist()
    else:
        ps = prompts(tok, args.prompts, args.prompt_len)
    out = {"rtts_ms": args.rtts, "modes": args.modes, "results": {},
           "exits": [{k: e.get(k) for k in ("index", "layer", "val_loss")} for e in meta.get("exits", [])],
           "architecture": {k: getattr(model.cfg, k) for k in ("vocab_size", "d_model", "n_layers", "exit_layers")},
           "params": sum(p.numel() for p in model.parameters()), "tokens_seen": meta.get("tokens_seen"),
           "prompts_from": f"{args.prompt_data} (held-out val split)" if args.prompt_data else "stdlib file openings"}
    del model
    with tempfile.TemporaryDirectory() as tmp:
        split_checkpoint(ckpt, Path(tmp) / "shards", args.tiers)
        names = [part.split("=")[0] for part in args.tiers.split(",") if "=" in part]
        handles, nxt = [], None
        for t in reversed(names):
            h = await start_node(stage=load_tier(Path(tmp) / "shards", t, device=args.device,
                                                 dtype=getattr(torch, args.dtype)),
                                 **({"next": f"127.0.0.1:{nxt}"} if nxt else {}))
            handles.insert(0, h)
            nxt = h.port
        dev = handles[0]
        try:
            async with RelayClient(f"127.0.0.1:{dev.port}", timeout_s=120) as c:
                await run_mode(c, "plain", args.k, ps[:1], 8, G)  # warm-up (channels, first allocations)
                for rtt in args.rtts:
                    delay_hop(dev.node.engine, rtt)
                    row = {}
                    for mode in args.modes:
                        row[mode] = await run_mode(c, mode, args.k, ps, args.tokens, G)
                        r = row[mode]
                        print(f"rtt {rtt:>5.0f} ms  {mode:<8} decode {r['decode_tok_s']:7.1f} tok/s  "
                              f"e2e {r['e2e_tok_s']:7.1f} tok/s  acceptance {r['acceptance'] or 0:.3f}  "
                              f"tokens/round {r['tokens_per_round'] or 0:.2f}", flush=True)
                    base = row["plain"]
                    for mode, r in row.items():
                        r["identical_to_plain"] = r["tokens"] == base["tokens"]
                        r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
                    for r in row.values():
                        del r["tokens"]
                    out["results"][str(rtt)] = row
        finally:
            for h in handles:
                await h.stop()
    return out


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rtts = res["rtts_ms"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(res["modes"]):
        color = f"C{i}"
        ax.plot(rtts, [res["results"][str(r)][mode]["decode_tok_s"] for r in rtts], "o-", color=color, label=mode)
        if mode != "plain":
            ax2.plot(rtts, [res["results"][str(r)][mode]["speedup"] for r in rtts], "o-", color=color, label=mode)
    ax.set(xlabel="head <-> next tier round trip (ms)", ylabel="decode tokens/s per request (final exit)",
           yscale="log", title=title)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.axhline(TARGET_SPEEDUP_AT_40MS, color="red", lw=0.8, ls="--", label="target at 40 ms")
    ax2.set(xlabel="head <-> next tier round trip (ms)", ylabel="speedup over plain", title="speculative / plain")
    ax.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="2-core CPU mode: 3 prompts x 32 tokens (< 3 min)")
    ap.add_argument("--rtts", type=float, nargs="+", default=[0, 10, 40, 100], help="device<->edge round trips, ms")
    ap.add_argument("--modes", nargs="+", default=["plain", "spec", "spec-k4"], help="plain | spec | spec-kN")
    ap.add_argument("--k", type=int, default=8, help="draft cap of the adaptive mode")
    ap.add_argument("--prompts", type=int, default=8, help="requests per (mode, RTT)")
    ap.add_argument("--prompt-len", type=int, default=48, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per request")
    ap.add_argument("--tiers", default="device=0,edge=1,cloud=2..",
                    help="tiers as familial-deploy split takes them; the head drafts with its deepest exit")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--checkpoint", default=str(ROOT / "trunk" / "builtin"),
                    help="family checkpoint to split and serve (default: the built-in family)")
    ap.add_argument("--prompt-data", default=None,
                    help="take prompts from this prepared data directory's held-out val split (default: openings "
                         "of standard-library files)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda: where every tier runs")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                  "bfloat16 on CUDA)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and PNG")
    ap.add_argument("--tag", default=None, help="file name tag (default: cpu_<date> or <device>_<date>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.tokens = 3, 32
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        ap.error(f"--dtype {args.dtype!r}: expected float32, bfloat16 or float16")
    if not (Path(args.checkpoint) / "family.json").is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no family.json there")
    if "plain" not in args.modes:
        args.modes = ["plain"] + args.modes
    t0 = time.time()
    res = asyncio.run(bench(args))
    date = datetime.date.today().isoformat()
    dev = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().split()[-1].lower()
    tag = args.tag or f"{dev}_{date}"
    family = "builtin" if Path(args.checkpoint).resolve() == (ROOT / "trunk" / "builtin").resolve() else args.checkpoint
    res.update({"date": date, "wall_s": round(time.time() - t0, 1), "quick": args.quick, "family": family,
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(), "dtype": args.dtype,
                "tiers": args.tiers, "draft_exit": "the head tier's deepest", "target_exit": "final",
                "rtt_hop": "head -> next tier (tests.hop_delay); deeper hops loopback only",
                "prompts": args.prompts, "prompt_len": args.prompt_len, "tokens": args.tokens, "k_cap": args.k,
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "torch": torch.__version__, "threads": args.threads},
                "target": {"speedup_at_40ms": TARGET_SPEEDUP_AT_40MS}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"relay_speculative_{tag}.json").write_text(json.dumps(res, indent=1))
    name = "built-in family" if family == "builtin" else f"{Path(family).name} ({res['params'] / 1e6:.0f}M)"
    plot(res, out / f"relay_speculative_{tag}.png", f"{name}, {args.tiers}, batch 1, {tag}")
    print(f"wrote {out / f'relay_speculative_{tag}.json'} and .png in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
