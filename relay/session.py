"""Per-session state on one relay node and the table that bounds it (limits, LRU and idle eviction).

A session holds this tier's KV cache and, on every tier but the last, the *boundary log*: the trunk
state this tier hands to the next tier, for every position so far. Positions [acked, length) are
*pending*: computed here, not yet acknowledged by the next tier. The next request that goes deeper
sends all of them in one message (KV invariant); if the next tier lost the session (restart,
eviction) the log lets this node reopen it there and resend from position 0.

Limits: max sessions (opening one more evicts the least recently used idle session), max tokens per
session, max total bytes (KV + logs; the least recently used other sessions are evicted first), and an
idle timeout. A session busy with a request is never evicted. This file knows nothing of gRPC.

Legend: B batch (1), S positions logged, D d_model.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


class SessionError(Exception):
    """code is a gRPC status name: NOT_FOUND, RESOURCE_EXHAUSTED, ALREADY_EXISTS, INVALID_ARGUMENT."""

    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code


@dataclass
class Limits:
    max_sessions: int = 64            # live sessions on this node
    max_tokens: int = 4096            # positions per session (also capped by the model's max_seq_len)
    max_total_bytes: int = 4 << 30    # KV caches + boundary logs, all sessions
    idle_timeout_s: float = 600.0     # a session unused this long is closed


class BoundaryLog:
    """Trunk states (1, S, D) at this tier's output for positions [0, length); grows by doubling."""

    def __init__(self):
        self.buf_BSD: torch.Tensor | None = None
        self.length = 0

    def write(self, h_BTD: torch.Tensor, pos: int) -> None:
        assert pos == self.length, f"boundary log holds {self.length} positions, write at {pos}"
        end = pos + h_BTD.shape[1]
        if self.buf_BSD is None or end > self.buf_BSD.shape[1]:
            cap = max(16, end, 0 if self.buf_BSD is None else 2 * self.buf_BSD.shape[1])
            buf = h_BTD.new_empty(h_BTD.shape[0], cap, h_BTD.shape[2])
            if self.buf_BSD is not None:
                buf[:, :self.length] = self.buf_BSD[:, :self.length]
            self.buf_BSD = buf
        self.buf_BSD[:, pos:end] = h_BTD
        self.length = end

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.buf_BSD[:, start:stop]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return 0 if self.buf_BSD is None else self.buf_BSD.numel() * self.buf_BSD.element_size()


@dataclass
class Session:
    id: str
    max_tokens: int
    cache: object                          # this tier's KV cache (trunk + exit-branch layers)
    log: BoundaryLog | None                # None on the last tier
    length: int = 0                        # positions in this tier's cache
    acked: int = 0                         # positions the next tier holds (acknowledged)
    next_open: bool = False                # session opened on the next tier
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False

    def truncate(self, length: int) -> None:
        """Forget positions >= length (a replay from the previous tier restarts there)."""
        self.cache.truncate(length)
        if self.log is not None:
            self.log.truncate(length)
        self.length = min(self.length, length)
        self.acked = min(self.acked, length)

    def kv_bytes(self) -> int:
        return int(self.cache.nbytes())

    def log_bytes(self) -> int:
        return 0 if self.log is None else self.log.nbytes()

    def nbytes(self) -> int:
        return self.kv_bytes() + self.log_bytes()


class SessionTable:
    def __init__(self, limits: Limits, make_cache, keeps_log: bool, model_max_tokens: int):
        self.limits = limits
        self._make_cache, self._keeps_log = make_cache, keeps_log
        self.max_tokens = min(limits.max_tokens, model_max_tokens)
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.evicted = 0
        self.on_evict = None                # callback(session) -> None, e.g. close it on the next tier

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, session_id: str | None, max_tokens: int = 0) -> Session:
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise SessionError("ALREADY_EXISTS", f"session {sid!r} already exists")
        if max_tokens < 0:
            raise SessionError("INVALID_ARGUMENT", f"max_tokens must be >= 0, got {max_tokens}")
        while len(self.sessions) >= self.limits.max_sessions:
            if not self._evict_one(keep=None):
                raise SessionError("RESOURCE_EXHAUSTED",
                                   f"all {self.limits.max_sessions} sessions are busy; try again later")
        cap = min(max_tokens or self.max_tokens, self.max_tokens)
        s = Session(sid, cap, self._make_cache(cap), BoundaryLog() if self._keeps_log else None)
        self.sessions[sid] = s
        return s

    def get(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise SessionError("NOT_FOUND", f"unknown session {sid!r} (never opened, closed or evicted)")
        s.last_used = time.monotonic()
        self.sessions.move_to_end(sid)
        return s

    def close(self, sid: str) -> Session | None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            s.closed = True
        return s

    def total_bytes(self) -> int:
        return sum(s.nbytes() for s in self.sessions.values())

    def enforce_bytes(self, current: Session) -> None:
        """Evict least recently used other sessions until under max_total_bytes."""
        while self.total_bytes() > self.limits.max_total_bytes:
            if not self._evict_one(keep=current):
                raise SessionError("RESOURCE_EXHAUSTED",
                                   f"session {current.id!r} needs {current.nbytes()} bytes; node limit is "
                                   f"{self.limits.max_total_bytes} bytes in all")

    def sweep_idle(self) -> int:
        now, n = time.monotonic(), 0
        for s in list(self.sessions.values()):
            if now - s.last_used > self.limits.idle_timeout_s and not s.lock.locked():
                self._evict(s)
                n += 1
        return n

    def _evict_one(self, keep: Session | None) -> bool:
        for s in self.sessions.values():  # LRU order
            if s is not keep and not s.lock.locked():
                self._evict(s)
                return True
        return False

    def _evict(self, s: Session) -> None:
        self.close(s.id)
        self.evicted += 1
        if self.on_evict is not None:
            self.on_evict(s)
