"""Tier-engine throughput on the `1b` preset shape (random bf16 weights, vocab 2048), in one run:

  roofline      HBM copy bandwidth and the batch-1 decode roofline (weight bytes / bandwidth)
  b1            batch-1 decode, final exit, in-process (tokens/s and ms/token)
  decode        pure decode at batch 1, 16 and 64, final exit, in-process: graph_probe's workload (the
                project's model math, static cache, torch.compile + CUDA graphs: 582 / 8.9k / 32.7k tok/s)
  profile       (only when named in --only) CUDA kernel time per decode step at batch 1 and 64, top kernels
  anatomy       (only when named in --only) a decode step split: the graph alone, Stage.forward, GEMV bandwidth
  nano          nano-vllm's workload: 256 requests, prompt and output lengths uniform in 100..1024,
                ignore_eos, all submitted at once, in-process (output tokens/s)
  mixed         the same workload with a third of the requests at exit 0, 1 and the final exit
  clients       1 vs 16 concurrent streams of 64-token requests, in-process (the 16x/1x ratio)
  overload      1,000 requests queued at once on a 16-slot pool: all complete, none lost
  relay         nano's workload and batch-1 decode through device, edge and cloud processes on one GPU
                over gRPC loopback (`python -m relay.cli` nodes); each tier's load during nano (rows per
                step, share of the wall in the stage, CPU per wall second) and, with --spy, its Python
                stacks (py-spy: top functions in the JSON's relay_spy)
  http          64 streaming HTTP clients through `familial-serve --tier router --checkpoint` (TTFT,
                per-token p50/p99, tokens/s)
  hf            transformers `generate` on the same shape: eager, and static cache + torch.compile
  demo          (only when named in --only) `familial-serve demo`, the README's main job, driven by 1, 16
                and 64 streaming HTTP clients: on the 2-core CPU, `--quick --only demo`

Writes engine_throughput.json (+ .png) under --out ($OUT on the GPU machine) after every section, so a
run cut short still reports what it measured. `--quick` runs every section on CPU at the `builtin` shape
with small workloads (a smoke test of this script, not a measurement).

    python3 benchmarks/engine_throughput.py --out "$OUT"                 # the H200 run
    python3 benchmarks/engine_throughput.py --quick --out /tmp/et        # CPU smoke
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"b1_fraction_of_roofline": 0.5, "decode_tok_s_over_probe": {1: 582, 16: 8900, 64: 32700},
           "nano_tok_s": 20000, "relay_over_inproc": 0.5,
           "relay_b1_latency_ratio": 1.6, "http64_tok_s": 5000, "clients16_over_1": 8.0, "mixed_over_final": 1.0}


def pct(xs, q):
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


async def tier_load(addresses: dict) -> dict:
    """Each relay tier's engine steps, rows, stage seconds, process CPU seconds and uptime (for deltas)."""
    from relay.client import RelayClient
    out = {}
    for t, addr in addresses.items():
        async with RelayClient(addr, timeout_s=10) as c:
            st = await c.stats()
        out[t] = {k: st["engine"][k] for k in ("steps", "rows", "stage_s")} | st["process"]
    return out


class Bench:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.dev = torch.device("cpu" if args.quick else "cuda")
        self.dtype = torch.float32 if args.quick else torch.bfloat16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.R: dict = {"device": self._device(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                        "python": platform.python_version(), "preset": args.preset or ("builtin" if args.quick else "1b"),
                        "vocab": 2048, "dtype": str(self.dtype), "targets": TARGETS, "sections": {}}
        if args.relay_node_args:
            self.R["relay_node_args"] = args.relay_node_args
        try:
            import triton
            self.R["triton"] = triton.__version__
        except ImportError:
            pass
        self.t0 = time.time()

    def _device(self) -> str:
        return torch.cuda.get_device_name() if torch.cuda.is_available() and not self.quick else platform.processor() or "cpu"

    def save(self) -> None:
        self.R["wall_s"] = round(time.time() - self.t0, 1)
        (self.out / "engine_throughput.json").write_text(json.dumps(self.R, indent=1))

    def section(self, name: str, fn, default: bool = True) -> None:
        if (self.args.only and name not in self.args.only.split(",")) or (not self.args.only and not default):
            return
        if time.time() - self.t0 > self.args.budget_s:
            self.R["sections"][name] = {"skipped": "time budget spent"}
            return
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            self.R["sections"][name] = fn() | {"section_s": round(time.time() - t, 1)}
        except Exception as e:  # noqa: BLE001 - report and go on to the next section
            import traceback
            traceback.print_exc()
            self.R["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:800]}
        print(json.dumps(self.R["sections"][name])[:1500], flush=True)
        self.save()

    # ---- the model and the in-process engine ---------------------------------------------------
    def config(self):
        from trunk.config import get_preset
        return get_preset(self.R["preset"]).replace(vocab_size=2048)

    def model(self):
        from trunk.model import FamilyModel
        torch.manual_seed(0)
        with torch.device(self.dev):
            m = FamilyModel(self.config())
        return m.to(self.dtype).eval()

    def engine(self, model, *, slots: int, max_len: int | None = None, exits=None):
        from relay.node import NodeConfig, make_pool
        from relay.tier import TierConfig, TierEngine
        from trunk.stage import Stage

        stage = Stage(model, exits or list(range(model.cfg.G)))
        pool = make_pool(stage, NodeConfig(max_slots=slots, max_model_len=max_len, kv_memory_fraction=0.6), self.dev)
        conf = TierConfig(max_batch_tokens=8192 if not self.quick else 2048, max_batch_seqs=slots, offload=False)
        eng = TierEngine(stage, pool, "local", None, conf)
        cap = eng.capture_graphs()
        return eng, cap

    async def offline(self, eng, reqs) -> dict:
        """Submit every request at once; collect tokens via callbacks (no per-token task wake-ups)."""
        done = asyncio.get_running_loop().create_future()
        left = [len(reqs)]
        stats = {r.request_id: {"n": 0, "t_first": None, "t_last": None, "exits": set()} for r in reqs}

        def emitter(rid):
            st = stats[rid]

            def emit(ev):
                now = time.perf_counter()
                if ev.token >= 0:
                    st["n"] += 1
                    st["t_first"] = st["t_first"] or now
                    st["t_last"] = now
                    st["exits"].add(ev.exit)
                if ev.finish_reason:
                    st["finish"] = ev.finish_reason
                    left[0] -= 1
                    if not left[0]:
                        done.set_result(None)
            return emit

        eng.start()
        t0 = time.perf_counter()
        for r in reqs:
            eng.generate(r, emitter(r.request_id))
        await done
        wall = time.perf_counter() - t0
        n = sum(s["n"] for s in stats.values())
        ttft = [(s["t_first"] - t0) * 1e3 for s in stats.values() if s["t_first"]]
        return {"requests": len(reqs), "output_tokens": n, "wall_s": round(wall, 3), "tok_s": round(n / wall, 1),
                "finished": sum(1 for s in stats.values() if s.get("finish") in ("length", "stop")),
                "ttft_ms_p50": round(pct(ttft, 50), 1), "ttft_ms_p99": round(pct(ttft, 99), 1),
                "ttft_ms_max": round(max(ttft, default=0.0), 1)}

    def nano_requests(self, n: int, lo: int, hi: int, exits=None, seed: int = 0):
        from relay.work import GenRequest
        rng = random.Random(seed)
        V = 2048
        out = []
        for i in range(n):
            P, O = rng.randint(lo, hi), rng.randint(lo, hi)
            g = None if exits is None else exits[i % len(exits)]
            out.append(GenRequest(f"n{i}", [rng.randrange(V) for _ in range(P)], O, exit=g, ignore_eos=True))
        return out

    # ---- sections ------------------------------------------------------------------------------
    def roofline(self) -> dict:
        m = self.model()
        param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
        out = {"param_bytes": param_bytes}
        if self.dev.type == "cuda":
            from triton.testing import do_bench
            x = torch.empty(1 << 28, device="cuda", dtype=torch.bfloat16)
            y = torch.empty_like(x)
            ms = do_bench(lambda: y.copy_(x), quantiles=[0.5])
            out["copy_TBps"] = round(2 * x.numel() * 2 / ms / 1e9, 3)
            out["roofline_b1_tok_s"] = round(out["copy_TBps"] * 1e12 / param_bytes, 1)
            del x, y
        self.R["roofline"] = out
        return out

    def b1(self) -> dict:
        from relay.work import GenRequest
        m = self.model()
        eng, cap = self.engine(m, slots=4)
        n = 64 if self.quick else 512
        res = {}

        async def go():
            for g in sorted({0, m.cfg.G - 1}):
                await self.offline(eng, [GenRequest(f"b1-{g}-warm", list(range(16)), 32, exit=g, ignore_eos=True)])
                r = await self.offline(eng, [GenRequest(f"b1-{g}", list(range(16)), n, exit=g, ignore_eos=True)])
                st = r["wall_s"] * 1e3 - r["ttft_ms_p50"]
                res[f"exit{g}"] = {"tokens": n, "decode_tok_s": round((n - 1) / (st / 1e3), 1),
                                   "ms_per_token": round(st / (n - 1), 3)}
            await eng.stop()
        asyncio.run(go())
        final = res[f"exit{m.cfg.G - 1}"]
        roof = self.R.get("roofline", {}).get("roofline_b1_tok_s")
        if roof:
            final["fraction_of_roofline"] = round(final["decode_tok_s"] / roof, 3)
        return res | {"graph_capture_s": round(cap, 1), "graphs": len(eng.stage.graphs.graphs) if eng.stage.graphs else 0}

    def decode(self) -> dict:
        """graph_probe's workload: B requests submitted at once, each 256 greedy tokens at the final exit
        after a short prompt; decode tok/s counts the tokens after every request's first one, over the time
        from the last first token to the end (prefill excluded, as the probe excludes it)."""
        from relay.work import GenRequest
        m = self.model()
        eng, _ = self.engine(m, slots=64)
        n = 32 if self.quick else 256
        out = {}

        async def go():
            for B in (1, 16, 64):
                warm = [GenRequest(f"dw{B}-{i}", list(range(1, 4)), 16, ignore_eos=True) for i in range(B)]
                await self.offline(eng, warm)
                reqs = [GenRequest(f"d{B}-{i}", [1 + i % 97, 2, 3], n, ignore_eos=True) for i in range(B)]
                r = await self.offline(eng, reqs)
                dt = r["wall_s"] - r["ttft_ms_max"] / 1e3
                tok_s = (r["output_tokens"] - B) / dt
                out[f"b{B}"] = {"decode_tok_s": round(tok_s, 1), "ttft_ms_max": r["ttft_ms_max"]}
                if self.dev.type == "cuda":  # the probe's figures are the H200's
                    out[f"b{B}"]["over_probe"] = round(tok_s / TARGETS["decode_tok_s_over_probe"][B], 3)
            await eng.stop()
        asyncio.run(go())
        return out

    def profile(self) -> dict:
        """Where a batch-1 and a batch-64 decode step spend their time: CUDA kernel time per step
        (torch.profiler) against the step's wall time; the top kernels."""
        from relay.work import GenRequest
        from torch.profiler import ProfilerActivity, profile
        m = self.model()
        eng, _ = self.engine(m, slots=64)
        out = {}

        async def go(B: int):
            await self.offline(eng, [GenRequest(f"pw{B}-{i}", list(range(16)), 8, ignore_eos=True) for i in range(B)])
            reqs = [GenRequest(f"p{B}-{i}", list(range(16)), 40, ignore_eos=True) for i in range(B)]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                r = await self.offline(eng, reqs)
            return r, prof
        for B in (1, 64):
            r, prof = asyncio.run(go(B))
            rows = sorted(((e.key, getattr(e, "self_device_time_total", 0), e.count) for e in prof.key_averages()),
                          key=lambda t: -t[1])
            total_us = sum(t[1] for t in rows)
            steps = 40
            out[f"b{B}"] = {"wall_ms_per_step": round(r["wall_s"] * 1e3 / steps, 3),
                            "gpu_ms_per_step": round(total_us / 1e3 / steps, 3),
                            "top": [(k[:60], round(us / 1e3 / steps, 4), c // steps) for k, us, c in rows[:18]]}
        asyncio.run(eng.stop())
        return out

    def anatomy(self) -> dict:
        """Where a decode step's time goes, without the profiler: the captured graph alone (CUDA events
        over many replays), `Stage.forward` of a whole step (host copies + graph + sampling + sync), and
        the engine's per-token time from b1; plus each block GEMV's achieved bandwidth at one row."""
        from relay.work import GenRequest
        from trunk.stage import SeqRun
        from triton.testing import do_bench
        m = self.model()
        eng, _ = self.engine(m, slots=64)
        st, pool = eng.stage, eng.pool
        out = {}

        async def warm():
            await self.offline(eng, [GenRequest(f"aw-{i}", list(range(16)), 4, ignore_eos=True) for i in range(4)])
        asyncio.run(warm())
        G = m.cfg.G
        for B in (1, 16, 64):
            slots = [pool.alloc() for _ in range(B)]
            g, _ = st.graphs.graphs[("all", st.graphs.bucket(B), True)]
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            torch.cuda.synchronize()
            ev[0].record()
            for _ in range(200):
                g.replay()
            ev[1].record()
            torch.cuda.synchronize()
            graph_ms = ev[0].elapsed_time(ev[1]) / 200
            ids = torch.zeros(B, dtype=torch.long)

            def fwd():
                runs = [SeqRun(s, 100, 1, [100] * len(st.segments), want=G - 1) for s in slots]
                return st.forward(ids, runs, pool)
            for _ in range(5):
                fwd()
            t = time.perf_counter()
            for _ in range(100):
                fwd()
            fwd_ms = (time.perf_counter() - t) * 10
            for s in slots:
                pool.free(s)
            out[f"b{B}"] = {"graph_ms": round(graph_ms, 4), "stage_forward_ms": round(fwd_ms, 4),
                            "graph_weight_TBps": round(sum(p.numel() * 2 for p in m.parameters()) / graph_ms / 1e9, 3)}
        blk = st.fused[st.layer_ids[0]]
        gemv = {}
        x = torch.randn(1, m.cfg.d_model, device="cuda", dtype=self.dtype)
        xf = torch.randn(1, m.cfg.d_ff, device="cuda", dtype=self.dtype)
        for name, w, inp in (("qkv", blk.w_qkv, x), ("o", blk.w_o, x), ("gate_up", blk.w_gu, x), ("down", blk.w_d, xf)):
            ms = do_bench(lambda: torch.nn.functional.linear(inp, w), quantiles=[0.5])
            gemv[name] = {"shape": list(w.shape), "us": round(ms * 1e3, 2), "TBps": round(w.numel() * 2 / ms / 1e9, 3)}
        out["gemv_b1"] = gemv
        asyncio.run(eng.stop())
        return out

    def nano(self, exits=None, name="nano") -> dict:
        m = self.model()
        slots = 64 if self.quick else 256
        eng, cap = self.engine(m, slots=slots)
        n, lo, hi = (16, 8, 64) if self.quick else (256, 100, 1024)
        async def go():
            await self.offline(eng, self.nano_requests(min(n, 32), 16, 32, exits, seed=1))   # warm-up
            eng.counters["steps"] = 0
            out = await self.offline(eng, self.nano_requests(n, lo, hi, exits))
            await eng.stop()
            return out
        r = asyncio.run(go())
        r |= {"engine_steps": eng.counters["steps"], "graph_capture_s": round(cap, 1), "slots": slots,
              "pool": eng.pool.describe()}
        self.R[f"{name}_tok_s"] = r["tok_s"]
        return r

    def mixed(self) -> dict:
        G = self.config().G
        r = self.nano(exits=[0, 1, G - 1], name="mixed")
        base = self.R.get("nano_tok_s")
        if base:
            r["over_all_final"] = round(r["tok_s"] / base, 3)
        return r

    def clients(self) -> dict:
        """1 vs 16 concurrent streams (async iterators, as a server's handlers consume them)."""
        from relay.work import GenRequest
        m = self.model()
        eng, _ = self.engine(m, slots=32)
        n_tok = 32 if self.quick else 64

        async def run(k: int, rounds: int):
            eng.start()
            toks = 0

            async def client(c):
                nonlocal toks
                for r in range(rounds):
                    req = GenRequest(f"c{k}-{c}-{r}-{time.perf_counter_ns()}", list(range(1, 17)), n_tok, ignore_eos=True)
                    async for ev in eng.stream(req):
                        toks += ev.token >= 0
            t0 = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(k)))
            return toks / (time.perf_counter() - t0)
        async def go():
            await run(2, 1)
            a, b = await run(1, 4), await run(16, 4)
            await eng.stop()
            return a, b
        one, sixteen = asyncio.run(go())
        return {"tok_s_1": round(one, 1), "tok_s_16": round(sixteen, 1), "ratio": round(sixteen / one, 2)}

    def overload(self) -> dict:
        from relay.work import GenRequest
        m = self.model()
        eng, _ = self.engine(m, slots=16, max_len=512)
        rng = random.Random(3)
        reqs = [GenRequest(f"o{i}", [rng.randrange(2048) for _ in range(rng.randint(8, 64))], rng.randint(4, 32),
                           ignore_eos=True) for i in range(1000)]
        async def go():
            out = await self.offline(eng, reqs)
            await eng.stop()
            return out
        r = asyncio.run(go())
        shape = eng.pool.shape
        full = self.config()
        from trunk.kv_pool import PoolShape
        s2k = PoolShape(shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.n_logs, shape.d_model, 2048,
                        shape.dtype)
        free = torch.cuda.mem_get_info()[0] if self.dev.type == "cuda" else None
        r |= {"lost": 1000 - r["finished"], "pool_slots": 16, "bytes_per_token": shape.bytes_per_token(),
              "bytes_per_2k_sequence": s2k.bytes_per_slot(),
              "2k_sequences_per_GiB": round(2**30 / s2k.bytes_per_slot(), 2),
              "2k_sequences_in_free_memory_at_0.9": None if free is None else int(0.9 * free // s2k.bytes_per_slot()),
              "model_max_seq_len": full.max_seq_len}
        return r

    # ---- processes -----------------------------------------------------------------------------
    def _checkpoint(self, tmp: Path) -> Path:
        from trunk.checkpoint import save_checkpoint
        from trunk.tokenizer import ByteTokenizer
        m = self.model()
        ckpt = tmp / "ckpt"
        save_checkpoint(ckpt, m.float() if self.quick else m, ByteTokenizer(), exit_val_loss=None,
                        dtype="float32" if self.quick else "bfloat16")
        return ckpt

    @staticmethod
    def _port() -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p

    def relay(self) -> dict:
        from deploy.shards import split_checkpoint
        from serving.local_family import LocalFamily
        tmp = Path(tempfile.mkdtemp(prefix="et-relay-"))
        ckpt = self._checkpoint(tmp)
        split_checkpoint(ckpt, tmp / "shards", "device=0,edge=1,cloud=2..")
        common = ["--device", "cpu" if self.quick else "cuda", "--max-slots", "64" if self.quick else "256",
                  "--no-verify", *([] if self.quick else ["--dtype", "bfloat16"]),
                  *shlex.split(self.args.relay_node_args)]
        frac = {"device": 0.1, "edge": 0.1, "cloud": 0.3}
        fam = LocalFamily(tmp / "shards", ["device", "edge", "cloud"], start_timeout_s=300, args=common,
                          node_args={t: ["--kv-memory-fraction", str(f)] for t, f in frac.items()},
                          log_dir=tmp, echo=False, micro_batches=None)  # the node's default, or --relay-node-args
        t0 = time.time()
        try:
            fam.start()
            return asyncio.run(asyncio.wait_for(self._relay_client(fam, t0), self.args.section_timeout_s))
        except BaseException:
            if fam.addresses:
                self.R["relay_stats_at_failure"] = asyncio.run(self._tier_stats(fam.addresses))
            for p in fam.procs.values():  # relay.cli prints every thread's stack on SIGUSR1: the logs then say where
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            raise
        finally:
            fam.stop()
            for t in fam.tiers:
                log = tmp / f"{t}.log"
                self.R.setdefault("relay_logs", {})[t] = log.read_text()[-12000:] if log.exists() else ""

    @staticmethod
    async def _tier_stats(addresses: dict) -> dict:
        """Each tier's engine stats (queue, running, steps), to say where a stalled relay stopped."""
        from relay.client import RelayClient
        out = {}
        for t, addr in addresses.items():
            try:
                c = RelayClient(addr, timeout_s=5)
                st = await asyncio.wait_for(c.stats(), 5)
                out[t] = {k: v for k, v in st.items() if k != "sessions"} | {"n_sessions": len(st["sessions"])}
                await c.close()
            except Exception as e:  # noqa: BLE001
                out[t] = f"{type(e).__name__}: {e}"[:200]
        return out

    @staticmethod
    def _check_alive(procs: dict, t0: float, limit_s: float, what: str) -> None:
        """Raise (so the section reports it and the tier logs are kept) when a process died or start-up is late."""
        dead = {t: p.returncode for t, p in procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"{what}: process exited during start-up: {dead}")
        if time.time() - t0 > limit_s:
            raise RuntimeError(f"{what}: not up after {limit_s:.0f} s")

    async def _relay_client(self, fam, t0: float) -> dict:
        from relay.client import RelayClient
        from relay.work import GenRequest

        await fam.chain_complete(timeout_s=300)
        self.R.setdefault("startup_s", {})["relay"] = round(time.time() - t0, 1)
        head, ports = fam.addresses["device"], fam.addresses
        c = RelayClient(head, timeout_s=600)
        prog = self.R.setdefault("relay_progress", {})   # kept when a phase times out: says where it stopped
        t_start = time.perf_counter()
        stream = c.generate_stream()

        split: dict[str, list[float]] = {}

        async def one(req, timings=False):
            first = last = None
            n = 0
            async for ev in stream.submit(req):
                if ev.token >= 0:
                    now = time.perf_counter()
                    first, last, n = first or now, now, n + 1
                    prog["tokens"] = prog.get("tokens", 0) + 1
                    if timings and n > 1:  # where a batch-1 token's time goes: each tier, each hop
                        for key, ms in ev.timings.items():
                            split.setdefault(key, []).append(ms)
                if ev.error:
                    raise RuntimeError(ev.error)
            prog["finished"] = prog.get("finished", 0) + 1
            return n, first, last

        def phase(name):
            prog["phase"], prog[f"{name}_at_s"] = name, round(time.perf_counter() - t_start, 2)
        phase("warm")
        await one(GenRequest("warm", list(range(16)), 16, ignore_eos=True))
        n_b1 = 64 if self.quick else 256
        phase("b1")
        n, first, last = await one(GenRequest("b1", list(range(16)), n_b1, ignore_eos=True), timings=True)
        b1_ms = (last - first) * 1e3 / (n - 1)
        phase("nano")
        n_req, lo, hi = (16, 8, 64) if self.quick else (256, 100, 1024)
        reqs = self.nano_requests(n_req, lo, hi)
        load0 = await tier_load(ports)
        spy = None
        if self.args.spy:  # each tier's Python stacks during nano (benchmarks/spy.py)
            from benchmarks.spy import Recorder
            spy = Recorder({t: fam.procs[t].pid for t in ports}, Path(self.args.out) / "relay_spy",
                           rate=self.args.spy_rate)
        t0 = time.perf_counter()
        try:
            outs = await asyncio.gather(*(one(r) for r in reqs))
        finally:
            if spy is not None:
                self.R["relay_spy"] = spy.stop()
        wall = time.perf_counter() - t0
        load1 = await tier_load(ports)
        # where the nano phase's time went at each tier: rows per step, the share of the wall in the stage
        # (GPU work and its launch) and the process's CPU seconds per wall second (host work, all threads)
        load = {t: {"steps": load1[t]["steps"] - load0[t]["steps"],
                    "rows_per_step": round((load1[t]["rows"] - load0[t]["rows"])
                                           / max(1, load1[t]["steps"] - load0[t]["steps"]), 1),
                    "stage_share": round((load1[t]["stage_s"] - load0[t]["stage_s"]) / wall, 3),
                    "cpu_per_wall": round((load1[t]["cpu_s"] - load0[t]["cpu_s"]) / wall, 3)} for t in ports}
        phase("done")
        toks = sum(o[0] for o in outs)
        stats = [await RelayClient(a).stats() for a in [head]]
        await stream.close()
        await c.close()
        r = {"b1_ms_per_token": round(b1_ms, 3), "b1_tok_s": round(1e3 / b1_ms, 1),
             "b1_ms_split": {k: round(sum(v) / len(v), 3) for k, v in split.items()}, "nano_output_tokens": toks,
             "nano_wall_s": round(wall, 2), "nano_tok_s": round(toks / wall, 1), "head_stats": stats[0]["engine"],
             "nano_tier_load": load}
        if self.R.get("nano_tok_s"):
            r["over_inproc"] = round(r["nano_tok_s"] / self.R["nano_tok_s"], 3)
        b1 = self.R["sections"].get("b1", {}).get(f"exit{self.config().G - 1}", {})
        if b1.get("ms_per_token"):
            r["b1_latency_over_inproc"] = round(b1_ms / b1["ms_per_token"], 3)
        return r

    def http(self) -> dict:
        tmp = Path(tempfile.mkdtemp(prefix="et-http-"))
        ckpt = self._checkpoint(tmp)
        return self._router(tmp, ["--tier", "router", "--checkpoint", str(ckpt), "--max-concurrency", "256",
                                  "--max-queue", "1024", "--calibrate-rounds", "1"])

    def demo(self) -> dict:
        """The README's main job as a user runs it: `familial-serve demo` (the built-in family split into
        device, edge and cloud nodes on loopback, and the router), driven by 1, 16 and 64 HTTP clients."""
        return self._router(Path(tempfile.mkdtemp(prefix="et-demo-")), ["demo"])

    def _router(self, tmp: Path, args: list[str]) -> dict:
        port = self._port()
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "serving.cli", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=open(tmp / "router.log", "w"), stderr=subprocess.STDOUT)
        try:
            return asyncio.run(asyncio.wait_for(self._http_clients(f"http://127.0.0.1:{port}", {"router": proc}),
                                               self.args.section_timeout_s))
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its nodes and deletes its shards
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.R.setdefault("http_log", (tmp / "router.log").read_text()[-12000:])

    async def _http_clients(self, url: str, procs: dict) -> dict:
        import httpx
        t0 = time.time()
        async with httpx.AsyncClient(timeout=600) as cl:
            while True:
                self._check_alive(procs, t0, 400, "router")
                try:
                    if (await cl.get(url + "/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
        self.R.setdefault("startup_s", {})["http"] = round(time.time() - t0, 1)
        n_tok = 32 if self.quick else 128
        ttft, itl, toks = [], [], [0]

        async def client(cl, k: int, rounds: int):
            for r in range(rounds):
                body = {"prompt": f"client {k} round {r}: once upon a time", "max_tokens": n_tok, "stream": True,
                        "ignore_eos": True, "temperature": 0}
                t_req = time.perf_counter()
                last = None
                async with cl.stream("POST", url + "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        ch = json.loads(line[6:])
                        n = len(ch["choices"][0].get("familial", {}).get("exits", [])) if ch.get("choices") else 0
                        if n:
                            if last is None:
                                ttft.append((now - t_req) * 1e3)
                            else:
                                itl.append((now - last) * 1e3 / n)
                            last = now
                            toks[0] += n

        out = {}
        for k in (1, 16, 64):
            ttft.clear()
            itl.clear()
            toks[0] = 0
            limits = httpx.Limits(max_connections=k + 8, max_keepalive_connections=k + 8)
            async with httpx.AsyncClient(timeout=600, limits=limits) as cl:
                await client(cl, -1, 1)
                ttft.clear(), itl.clear()
                toks[0] = 0
                t0 = time.perf_counter()
                await asyncio.gather(*(client(cl, i, 2 if k > 1 else 8) for i in range(k)))  # 1 client: 8 requests (a few seconds, not one)
                wall = time.perf_counter() - t0
            out[f"clients_{k}"] = {"tok_s": round(toks[0] / wall, 1), "ttft_ms_p50": round(pct(ttft, 50), 1),
                                   "ttft_ms_p99": round(pct(ttft, 99), 1), "tpot_ms_p50": round(pct(itl, 50), 2),
                                   "tpot_ms_p99": round(pct(itl, 99), 2), "tokens": toks[0]}
        out["ratio_16_over_1"] = round(out["clients_16"]["tok_s"] / out["clients_1"]["tok_s"], 2)
        return out

    def hf(self) -> dict:
        """transformers' generate on the same shape (LlamaForCausalLM = our trunk's final exit)."""
        from transformers import LlamaConfig, LlamaForCausalLM
        c = self.config()
        hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                         tie_word_embeddings=c.tie_embeddings)
        torch.manual_seed(0)
        m = LlamaForCausalLM(hc).to(self.dev, self.dtype).eval()
        n = 16 if self.quick else 64
        import transformers
        out = {"transformers": transformers.__version__}
        for mode in ("eager", "static+compile"):
            for B in (1, 16):
                if mode != "eager" and self.quick:
                    continue
                ids = torch.randint(0, c.vocab_size, (B, 16), device=self.dev)
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                if mode != "eager":  # generate compiles the decode step itself with a static cache
                    kw["cache_implementation"] = "static"   # (compiling m.forward as well breaks its graphs)
                try:
                    with torch.inference_mode():
                        m.generate(ids, **kw)
                        m.generate(ids, **kw)
                        if self.dev.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        m.generate(ids, **kw)
                        if self.dev.type == "cuda":
                            torch.cuda.synchronize()
                        out[f"{mode}_b{B}_tok_s"] = round(B * n / (time.perf_counter() - t0), 1)
                    if mode != "eager":  # proof that generate compiled it: graphs dynamo made so far
                        from torch._dynamo.utils import counters
                        out[f"{mode}_b{B}_dynamo_graphs"] = int(counters["stats"]["unique_graphs"])
                except Exception as e:  # noqa: BLE001
                    out[f"{mode}_b{B}_error"] = f"{type(e).__name__}: {e}"[:300]
        return out


def plot(R: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    S = R["sections"]
    bars = []
    b1 = S.get("b1", {})
    final = max((k for k in b1 if k.startswith("exit")), default=None)
    if final:
        bars.append(("b1 in-process", b1[final]["decode_tok_s"]))
    if R.get("roofline", {}).get("roofline_b1_tok_s"):
        bars.append(("b1 HBM roofline", R["roofline"]["roofline_b1_tok_s"]))
    if S.get("relay", {}).get("b1_tok_s"):
        bars.append(("b1 relay 3 procs", S["relay"]["b1_tok_s"]))
    for k, lab in (("nano", "nano 256 req in-proc"), ("mixed", "nano mixed exits"), ("relay", "nano relay 3 procs")):
        v = S.get(k, {}).get("tok_s" if k != "relay" else "nano_tok_s")
        if v:
            bars.append((lab, v))
    h = S.get("http", {})
    for k in (1, 16, 64):
        if f"clients_{k}" in h:
            bars.append((f"HTTP {k} clients", h[f"clients_{k}"]["tok_s"]))
    for k, v in S.get("hf", {}).items():
        if k.endswith("tok_s"):
            bars.append((f"HF {k[:-6]}", v))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="tab:blue")
    for i, (_, v) in enumerate(bars[::-1]):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens / s")
    ax.set_title(f"Familial tier engine, {R['preset']} shape, {R['device']} ({R['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for JSON + PNG")
    p.add_argument("--quick", action="store_true", help="CPU smoke run at the builtin shape, small workloads")
    p.add_argument("--preset", default="", help="model shape (default: 1b, builtin with --quick); `--quick --preset tiny "
                   "--only b1,relay` measures the relay's host work (the stage's compute is negligible)")
    p.add_argument("--only", default="", help="comma-separated sections (default: all)")
    p.add_argument("--budget-s", type=float, default=540, help="skip sections once this much wall time is spent")
    p.add_argument("--section-timeout-s", type=float, default=300,
                   help="give up on the relay/http section after this long (tier logs go into the JSON)")
    p.add_argument("--spy", action="store_true",
                   help="py-spy each relay tier during the relay's nano phase: top functions into the JSON "
                        "(relay_spy), raw stacks under OUT/relay_spy/ (needs py-spy)")
    p.add_argument("--spy-rate", type=int, default=200, help="py-spy samples per second (--spy)")
    p.add_argument("--relay-node-args", default="", metavar="ARGS",
                   help="extra `python -m relay.cli` options for every relay node, e.g. '--micro-batches 3' "
                        "(recorded in the JSON)")
    args = p.parse_args(argv)
    b = Bench(args)
    b.section("roofline", b.roofline)
    b.section("b1", b.b1)
    b.section("decode", b.decode)
    b.section("profile", b.profile, default=False)  # opt-in: the CUDA profiler stalled on graph replays (H200, torch 2.11)
    b.section("anatomy", b.anatomy, default=False)  # opt-in: a diagnostic of the batch-1 gap
    b.section("nano", b.nano)
    b.section("mixed", b.mixed)
    b.section("clients", b.clients)
    b.section("overload", b.overload)
    b.section("relay", b.relay)
    b.section("http", b.http)
    b.section("demo", b.demo, default=False)  # CPU: `--quick --only demo` (README: 16 clients >= 4x one)
    b.section("hf", b.hf)
    b.save()
    plot(b.R, b.out / "engine_throughput.png")
    print(json.dumps({k: v for k, v in b.R.items() if k not in ("relay_logs", "http_log")}, indent=1)[:6000])


if __name__ == "__main__":
    main()
