"""Load benchmark of the HTTP face over a real relay chain on loopback.

Starts, as separate processes through `familial-serve`, a device, an edge and a cloud node (shards split
from the checkpoint with deploy) and the router (`--tier router --family family.yaml`); then N concurrent
streaming clients send /v1/completions for a fixed time per scenario. Reported per scenario:
throughput (completion tokens/s, requests/s), TTFT and per-token latency p50/p99 (client side), budget
hit rate, tokens by exit, peak RSS per process (VmHWM), router decision overhead (µs per decision, from
the router's Prometheus histogram, plus an in-process microbenchmark of the planner).

Scenarios: `no-budget` (every token from the deepest exit), `budget` (log-uniform budgets; injected
per-tier delays stand in for slower remote tiers). Writes JSON and a PNG.

    python3 benchmarks/serve_load.py --clients 16 --seconds 20 --out benchmarks/results/serve_load
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["The history of the", "Once upon a time, a", "In the beginning there was", "A recipe for bread:",
           "The weather today is", "Dear friend, I write to", "Chapter one. The night", "Numbers: 1, 2, 3,"]


def pct(xs, q):
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def checkpoint(path: str | None, tmp: Path) -> Path:
    """The given checkpoint, else the built-in family, else random weights at the built-in preset's shape."""
    if path:
        return Path(path)
    builtin = ROOT / "trunk" / "builtin"
    if (builtin / "family.json").is_file():
        return builtin
    import torch

    from trunk import FamilyModel, get_preset
    from trunk.checkpoint import save_checkpoint
    from trunk.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = get_preset("builtin").replace(vocab_size=259)
    return save_checkpoint(tmp / "ckpt", FamilyModel(cfg), ByteTokenizer(), exit_val_loss=[3.0, 2.6, 2.3])


class Family:
    """Three node processes (started as the demo starts them: serving/local_family.py) and the router process."""

    def __init__(self, shards: Path, tmp: Path, delays: dict[str, float], base_port: int, device: str = "cpu"):
        from serving.local_family import LocalFamily

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        tiers = ["device", "edge", "cloud"]
        self.logs = tmp / f"family-{base_port}"
        self.logs.mkdir(parents=True, exist_ok=True)
        # tests.slow_tiers (every delay given, 0 included): familial-serve with a per-step delay on a tier
        self.nodes = LocalFamily(shards, tiers, {t: delays.get(t, 0.0) for t in tiers}, args=["--device", device],
                                 log_dir=self.logs, echo=False, micro_batches=None).start()
        self.procs: dict[str, subprocess.Popen] = dict(self.nodes.procs)
        self.router_port = base_port + 10
        y = self.logs / "family.yaml"
        y.write_text(f"name: bench\ntokenizer: {shards}\ntiers:\n" +
                     "".join(f"  - name: {t}\n    address: {self.nodes.addresses[t]}\n" for t in tiers))
        self.procs["router"] = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "--tier", "router", "--family", str(y), "--port", str(self.router_port),
             "--max-concurrency", "64"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.logs / "router.log", "w"))
        self.url = f"http://127.0.0.1:{self.router_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("router did not come up: " + (self.logs / "router.log").read_text()[-3000:])

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.logs.glob("*.log")))

    def rss(self) -> dict[str, float]:
        return {name: round(peak_rss_mb(p.pid), 1) for name, p in self.procs.items()}

    def stop(self) -> None:
        router = self.procs["router"]
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
        self.nodes.stop()


async def client_loop(url: str, start_at: float, stop_at: float, max_tokens: int, budget, rng: random.Random,
                      out: list, temperature: float = 0.8) -> None:
    """Send streaming requests back to back until stop_at; record those sent after start_at (warm-up before)."""
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < stop_at:
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "stream": True, "temperature": temperature,
                    "ignore_eos": True, "seed": rng.randrange(1 << 30)}
            b = budget(rng) if budget else None
            if b is not None:
                body["latency_budget_ms"] = b
            t0 = time.perf_counter()
            times, n, final, exits = [], 0, None, []
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ch = json.loads(line[6:])
                    if "error" in ch:
                        out.append({"error": ch["error"]["message"]})
                        break
                    c = ch["choices"][0]
                    k = len(c.get("familial", {}).get("exits", []))
                    exits += c.get("familial", {}).get("exits", [])
                    if k:
                        times.append(time.perf_counter())
                        n += k
                    if c.get("finish_reason"):
                        final = c["familial"]
            if final is None or not times or t0 < start_at:
                continue
            e2e = (times[-1] - t0) * 1e3
            out.append({"ttft_ms": (times[0] - t0) * 1e3, "e2e_ms": e2e, "tokens": n,
                        "tpot_ms": (times[-1] - times[0]) * 1e3 / (n - 1) if n > 1 else None,
                        "budget_ms": b, "budget_met": final.get("budget_met"), "infeasible": final.get("infeasible"),
                        "replans": len(final.get("replans", [])), "exits": exits,
                        "predicted_ms": final.get("predicted_ms"), "server_e2e_ms": final["latency_ms"]["total"]})


def router_decision_us(url: str) -> dict:
    """Mean, and p50/p99 as histogram bucket upper bounds, of the router's live decision times (µs)."""
    text = httpx.get(url + "/metrics").text
    s = re.search(r"^familial_router_decision_seconds_sum ([0-9.e+-]+)$", text, re.M)
    c = re.search(r"^familial_router_decision_seconds_count ([0-9.e+-]+)$", text, re.M)
    if not (s and c) or float(c.group(1)) == 0:
        return {}
    n = float(c.group(1))
    buckets = [(float(le), float(v)) for le, v in
               re.findall(r'^familial_router_decision_seconds_bucket\{le="([0-9.e+-]+)"\} ([0-9.e+-]+)$', text, re.M)]
    q = lambda f: next((round(le * 1e6, 1) for le, v in sorted(buckets) if v >= f * n), math.inf)
    return {"mean": round(float(s.group(1)) / n * 1e6, 2), "p50_le": q(0.5), "p99_le": q(0.99), "count": int(n)}


def planner_microbench(url: str) -> dict:
    """Time ExitPlanner.plan / replan on the router's calibrated latency model, in this process."""
    from serving.exit_policy import ExitInfo, ExitPlanner

    card = httpx.get(url + "/v1/models").json()["data"][0]
    exits = [ExitInfo(e["index"], e["layer"], e["tier"], e["val_loss"]) for e in card["exits"]]
    p = ExitPlanner(exits)
    for g, c in card["latency_model"]["exits"].items():  # the router's learned costs, as it last saw them
        for _ in range(max(1, c["samples"])):
            p.model.observe_token(int(g), c["token_ms"])
        p.model.cost[int(g)].prefill_ms_per_token.value = c["prefill_ms_per_token"]
    rng = random.Random(0)
    budgets = [rng.uniform(10, 5000) for _ in range(5000)]
    t0 = time.perf_counter()
    for b in budgets:
        p.plan(b, 8, 32)
    plan_us = (time.perf_counter() - t0) / len(budgets) * 1e6
    t0 = time.perf_counter()
    for b in budgets:
        p.replan(2, b, 16)
    replan_us = (time.perf_counter() - t0) / len(budgets) * 1e6
    return {"plan_us": round(plan_us, 2), "replan_us": round(replan_us, 2)}


def summarize(rows: list, seconds: float) -> dict:
    errors = [r["error"] for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    toks = sum(r["tokens"] for r in rows)
    budgeted = [r for r in rows if r["budget_ms"] is not None]
    feasible = [r for r in budgeted if not r["infeasible"]]
    by_exit: dict[str, int] = {}
    for r in rows:
        for e in r["exits"]:
            by_exit[str(e)] = by_exit.get(str(e), 0) + 1
    # an outside definition of "feasible": at least the p95 end-to-end time of requests served wholly by
    # the device exit under the same load (the router's own `infeasible` flag is the other one)
    device_only = [r["e2e_ms"] for r in rows if set(r["exits"]) == {0}]
    floor = pct(device_only, 95)
    above = [r for r in budgeted if r["budget_ms"] >= floor]
    tpot = [r["tpot_ms"] for r in rows if r["tpot_ms"] is not None]
    ttft = [r["ttft_ms"] for r in rows]
    return {
        "requests": len(rows), "errors": len(errors), "first_error": errors[0] if errors else None,
        "completion_tokens": toks,
        "throughput_tokens_per_s": round(toks / seconds, 1), "requests_per_s": round(len(rows) / seconds, 2),
        "ttft_ms": {"p50": round(pct(ttft, 50), 2), "p99": round(pct(ttft, 99), 2)},
        "per_token_ms": {"p50": round(pct(tpot, 50), 2), "p99": round(pct(tpot, 99), 2)},
        "e2e_ms": {"p50": round(pct([r["e2e_ms"] for r in rows], 50), 1),
                   "p99": round(pct([r["e2e_ms"] for r in rows], 99), 1)},
        "budget_requests": len(budgeted),
        "budget_hit_rate": round(sum(bool(r["budget_met"]) for r in budgeted) / len(budgeted), 4) if budgeted else None,
        "budget_infeasible": sum(bool(r["infeasible"]) for r in budgeted),
        "budget_hit_rate_feasible": (round(sum(bool(r["budget_met"]) for r in feasible) / len(feasible), 4)
                                     if feasible else None),
        "device_only_e2e_p95_ms": round(floor, 1) if device_only else None,
        "budget_requests_above_device_p95": len(above),
        "budget_hit_rate_above_device_p95": (round(sum(bool(r["budget_met"]) for r in above) / len(above), 4)
                                             if above else None),
        "replans": sum(r["replans"] for r in rows),
        "tokens_by_exit": by_exit,
    }


def run_scenario(name, shards, tmp, delays, args, budget, base_port) -> tuple[dict, list]:
    fam = Family(shards, tmp, delays, base_port, args.node_device)
    try:
        rows: list = []
        start_at = time.perf_counter() + args.warmup
        stop_at = start_at + args.seconds
        rng = random.Random(1)

        async def go():
            await asyncio.gather(*(client_loop(fam.url, start_at, stop_at, args.max_tokens, budget,
                                               random.Random(rng.random()), rows, args.temperature)
                                   for _ in range(args.clients)))

        asyncio.run(go())
        elapsed = time.perf_counter() - start_at
        res = summarize(rows, elapsed)
        if res["errors"]:
            print(f"{res['errors']} request(s) failed, first: {res['first_error']}\n{fam.log_tails()}", file=sys.stderr)
        res.update({"scenario": name, "seconds": round(elapsed, 1), "warmup_s": args.warmup, "clients": args.clients,
                    "node_device": args.node_device, "temperature": args.temperature,
                    "max_tokens": args.max_tokens, "inject_delay_ms": delays, "peak_rss_mb": fam.rss(),
                    "router_decision_us_live": router_decision_us(fam.url),
                    "router_decision_us_microbench": planner_microbench(fam.url)})
        return res, rows
    finally:
        fam.stop()


def plot(results: list, rows_by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for res in results:
        rows = rows_by[res["scenario"]]
        for a, key in ((ax[0], "ttft_ms"), (ax[1], "tpot_ms")):
            xs = sorted(r[key] for r in rows if r[key] is not None)
            a.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=res["scenario"])
    ax[0].set(xlabel="TTFT (ms)", ylabel="CDF", title="time to first token", xscale="log")
    ax[1].set(xlabel="per-token latency (ms)", ylabel="CDF", title="time per output token", xscale="log")
    for a in ax[:2]:
        a.legend()
        a.grid(alpha=0.3)
    b = next((r for r in results if r["scenario"] == "budget"), None)
    if b:
        rows = rows_by["budget"]
        col = {0: "tab:green", 1: "tab:orange", 2: "tab:red"}
        for r in rows:
            c = col.get(r["exits"][0], "k")
            ax[2].scatter(r["budget_ms"], r["e2e_ms"], s=10, facecolors="none" if r["infeasible"] else c, edgecolors=c)
        lim = [min(r["budget_ms"] for r in rows), max(r["budget_ms"] for r in rows)]
        ax[2].plot(lim, lim, "k--", lw=1)
        ax[2].set(xscale="log", yscale="log", xlabel="latency budget (ms)", ylabel="end-to-end (ms)",
                  title=f"budgets met: {b['budget_hit_rate']:.0%} all, "
                        f"{b['budget_hit_rate_above_device_p95']:.0%} >= device p95 (dotted)")
        if b.get("device_only_e2e_p95_ms"):
            ax[2].axvline(b["device_only_e2e_p95_ms"], color="tab:green", lw=0.8, ls=":")
        ax[2].text(0.02, 0.97, "first exit: device (green), edge (orange), cloud (red)\nhollow = flagged infeasible",
                   transform=ax[2].transAxes, va="top", fontsize=8)
        ax[2].grid(alpha=0.3)
    fig.suptitle(f"familial serve_load: {results[0]['clients']} streaming clients, {results[0]['max_tokens']} tokens "
                 f"each, loopback, {os.cpu_count()} CPU cores, nodes on {results[0].get('node_device', 'cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="family checkpoint (default: trunk/builtin, else random weights at its shape)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--seconds", type=float, default=20, help="duration of each scenario")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of load before measuring (the router's "
                                                            "latency model learns the loaded state)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    ap.add_argument("--delays", default="edge=5,cloud=20", help="injected per-forward delays of the budget scenario")
    ap.add_argument("--budget-ms", default="500:6000", help="LO:HI of the log-uniform latency budgets")
    ap.add_argument("--scenarios", default="no-budget,budget", help="comma-separated scenarios to run")
    ap.add_argument("--port", type=int, default=18700, help="first port used (each scenario takes a block of 20)")
    ap.add_argument("--out", default="benchmarks/results/serve_load", help="output path without extension")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the requests (0 = greedy)")
    ap.add_argument("--node-device", default="cpu", help="torch device of the three nodes (cpu, cuda)")
    ap.add_argument("--dump-rows", help="also write every request's record to this JSON file")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date recorded in the results")
    ap.add_argument("--replot", metavar="ROWS_JSON", help="only redraw the PNG from --out's JSON and a --dump-rows file")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(json.loads(out.with_suffix(".json").read_text())["scenarios"], json.loads(Path(args.replot).read_text()),
             out.with_suffix(".png"))
        return

    from deploy.shards import split_checkpoint

    lo, hi = (float(x) for x in args.budget_ms.split(":"))
    delays = {k: float(v) for k, v in (p.split("=") for p in args.delays.split(",") if p)}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        ckpt = checkpoint(args.checkpoint, tmp)
        split_checkpoint(ckpt, tmp / "shards", "device=0,edge=1,cloud=2..")
        results, rows_by = [], {}
        for i, name in enumerate(s for s in args.scenarios.split(",") if s):
            if name == "no-budget":
                res, rows = run_scenario(name, tmp / "shards", tmp, {}, args, None, args.port + 20 * i)
            elif name == "budget":
                res, rows = run_scenario(name, tmp / "shards", tmp, delays, args,
                                         lambda r: lo * (hi / lo) ** r.random(), args.port + 20 * i)
                res["budget_ms_range"] = [lo, hi]
            else:
                raise SystemExit(f"unknown scenario {name!r}")
            print(json.dumps(res, indent=1), flush=True)
            results.append(res)
            rows_by[name] = [r for r in rows if "error" not in r]
    if args.dump_rows:
        Path(args.dump_rows).write_text(json.dumps(rows_by))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": args.date, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (loopback)",
            "node_device": args.node_device,
            "python": platform.python_version(), "checkpoint": str(args.checkpoint or "builtin (or random at its shape)"),
            "note": "clients, router and three nodes share the same cores; latencies are client-side"}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "scenarios": results}, indent=2) + "\n")
    plot(results, rows_by, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
