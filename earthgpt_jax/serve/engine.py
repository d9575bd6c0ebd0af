"""One worker thread that owns the model and decodes every chat request, batched and interleaved.

Scheduling (why it is shaped this way):

- Requests wait in a bounded queue. When the worker admits them, all that are waiting (up to
  `max_batch`) become one *group*: one batched prefill (images and left-padded prompts), then
  one batched `decode_step` per token for the whole group. Any requests can share a group:
  prompts are left-padded to a common bucket and the KV cache is sized for the longest
  `max_new_tokens`; each row stops on its own (`</s>`, its token limit, a stop string, or its
  client going away).
- Groups are not merged once running (their caches have different lengths), so several groups
  may be live at once (up to `max_groups`) and the worker steps them round-robin, one token
  each. A request that arrives while another user's long answer is being written is prefilled
  after at most one step of every live group and then advances at the same pace: two users
  never wait for each other's whole answer.
- Shapes are bucketed (batch to a power of two, prompt to a multiple of `PROMPT_BUCKET`, new
  tokens to a multiple of `NEW_TOKENS_BUCKET`), so XLA compiles a handful of programs, not one
  per request.
- Tokens are picked on the host from each row's logits, so greedy and sampling rows (each with
  its own temperature, top-p and seed) share one batch.

Events go back through each request's `emit` callback (called on the worker thread):
`{"type": "token", "text": ...}` as text becomes safe to show, then exactly one of
`{"type": "done", ...}` or `{"type": "error", "message": ...}`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from earthgpt_jax.generate import sampling_logits
from earthgpt_jax.inference import PROMPT_BUCKET, InferenceSession, answer_text

NEW_TOKENS_BUCKET = 64


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclasses.dataclass
class Request:
    pixels: np.ndarray            # uint8 [S, S, 3]: the model's view of the image
    prompt_ids: list[int]         # text tokens after the visual prefix (chat template)
    max_new_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class _Row:
    request: Request
    rng: np.random.Generator
    generated: list = dataclasses.field(default_factory=list)
    shown: int = 0
    text: str = ""
    done: bool = False
    first_token_at: float | None = None


@dataclasses.dataclass
class _Group:
    rows: list
    logits: object
    cache: object
    key_valid: object
    position: object
    prefill_len: int
    new_tokens: int
    t: int = 0                    # tokens picked so far, minus one
    feed: np.ndarray | None = None  # the tokens to feed at the next step


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


def _batch_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pick_token(logits: np.ndarray, temperature: float, top_p: float,
               rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or top-p sampling (generate's filter) from one row of logits
    [V]; drawn on the host from the row's own generator, so a request's seed alone fixes its
    tokens whatever it is batched with."""
    if temperature <= 0:
        return int(np.argmax(logits))
    filtered = np.asarray(sampling_logits(logits[None], temperature, top_p)[0], np.float64)
    probs = np.exp(filtered - filtered.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


class Engine:
    """Owns the session's model on one worker thread; `submit` is safe from any thread."""

    def __init__(self, session: InferenceSession, *, max_batch: int = 8, max_groups: int = 4,
                 max_pending: int = 64, batch_window_s: float = 0.01):
        self.session = session
        # The session's layout: one restored from a workdir decodes unrolled layers.
        self.model, self.params = session.model, session.params
        self.tok = session.tokenizer
        self.max_batch, self.max_groups = max_batch, max_groups
        # An idle worker waits this long after the first request so that requests sent together
        # share one prefill; small next to a prefill, so a lone user does not notice it.
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._groups: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats = {"requests": 0, "groups": 0, "max_rows_in_group": 0,
                      "max_live_groups": 0, "tokens": 0, "errors": 0}

    # ------------------------------------------------------------------ public

    def submit(self, request: Request) -> None:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="earthgpt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        return self._queue.qsize()

    def live_rows(self) -> int:
        return sum(sum(not r.done for r in g.rows) for g in list(self._groups))

    def warmup(self, pixels: np.ndarray, prompt_ids: list[int], max_new_tokens: int) -> None:
        """Compile the usual shapes (one user, short prompt) before the first real request."""
        done = threading.Event()
        self.submit(Request(pixels, prompt_ids, max_new_tokens,
                            emit=lambda e: e["type"] in ("done", "error") and done.set()))
        done.wait()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        with self.session.context():
            self._loop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self._groups:
                try:
                    first = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if self._queue.empty() and self.batch_window_s > 0:
                    time.sleep(self.batch_window_s)
                self._admit([first])
            elif len(self._groups) < self.max_groups and not self._queue.empty():
                self._admit([])
            for _ in range(len(self._groups)):
                group = self._groups.popleft()
                try:
                    self._step(group)
                except Exception as e:  # noqa: BLE001 - a broken group must not kill the server
                    self._fail(group.rows, e)
                    continue
                if not all(r.done for r in group.rows):
                    self._groups.append(group)

    def _admit(self, taken: list) -> None:
        while len(taken) < self.max_batch:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for request in [r for r in taken if r.cancelled.is_set()]:
            request.emit({"type": "done", "finish": "cancelled", "answer": "", "tokens": 0})
        taken = [r for r in taken if not r.cancelled.is_set()]
        if not taken:
            return
        rows = [_Row(r, np.random.default_rng(r.seed)) for r in taken]
        try:
            group = self._prefill(rows)
        except Exception as e:  # noqa: BLE001
            self._fail(rows, e)
            return
        self.stats["groups"] += 1
        self.stats["requests"] += len(rows)
        self.stats["max_rows_in_group"] = max(self.stats["max_rows_in_group"], len(rows))
        group.feed = self._emit_tokens(group)
        if not all(r.done for r in rows):  # e.g. every answer was one token long
            self._groups.append(group)
            self.stats["max_live_groups"] = max(self.stats["max_live_groups"],
                                                len(self._groups))

    def _prefill(self, rows: list) -> _Group:
        from earthgpt_jax.generate import left_pad, prefill
        requests = [r.request for r in rows]
        batch = _batch_bucket(len(rows))
        new_tokens = _bucket(max(r.max_new_tokens for r in requests), NEW_TOKENS_BUCKET)
        # Filler rows repeat the first request (a fully padded row would attend to nothing).
        filled = requests + [requests[0]] * (batch - len(requests))
        tokens, valid = left_pad([r.prompt_ids for r in filled], self.tok.pad_id, PROMPT_BUCKET)
        images = np.stack([r.pixels for r in filled])
        logits, cache, key_valid, position = prefill(self.model, self.params, images, tokens,
                                                     valid, max_new_tokens=new_tokens)
        return _Group(rows, np.asarray(logits), cache, key_valid, np.asarray(position),
                      key_valid.shape[1] - new_tokens, new_tokens)

    def _emit_tokens(self, group: _Group) -> np.ndarray:
        """Pick each live row's next token from `group.logits`, stream its text; returns the
        tokens to feed back (padding for finished and filler rows)."""
        now = time.perf_counter()
        feed = np.full(group.logits.shape[0], self.tok.pad_id, np.int32)
        for i, row in enumerate(group.rows):
            if row.done:
                continue
            req = row.request
            if req.cancelled.is_set():
                self._finish(row, "cancelled")
                continue
            token = pick_token(group.logits[i], req.temperature, req.top_p, row.rng)
            if row.first_token_at is None:
                row.first_token_at = now
            if token == self.tok.eos_id:
                self._finish(row, "eos")
                continue
            row.generated.append(token)
            self.stats["tokens"] += 1
            row.text, stopped, safe = answer_text(self.tok, row.generated)
            if stopped:
                self._finish(row, "stop")
                continue
            if safe > row.shown:
                req.emit({"type": "token", "text": row.text[row.shown:safe]})
                row.shown = safe
            if len(row.generated) >= req.max_new_tokens or group.t + 1 >= group.new_tokens:
                self._finish(row, "length")
                continue
            feed[i] = token
        return feed

    def _step(self, group: _Group) -> None:
        from earthgpt_jax.generate import decode_step
        group.position = group.position + 1
        logits, group.cache, group.key_valid = decode_step(
            self.model, self.params, group.feed, group.cache, group.key_valid, group.position,
            group.prefill_len + group.t)
        group.logits = np.asarray(logits)
        group.t += 1
        group.feed = self._emit_tokens(group)

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        req = row.request
        if row.shown < len(row.text) and reason != "cancelled":
            req.emit({"type": "token", "text": row.text[row.shown:]})
            row.shown = len(row.text)
        end = time.perf_counter()
        first = row.first_token_at or end
        n = len(row.generated)
        req.emit({
            "type": "done", "finish": reason, "answer": row.text.strip(), "tokens": n,
            "ttft_s": round(first - req.submitted, 4),
            # Decode speed after the first token: what a user sees streaming.
            "tokens_per_s": round((n - 1) / (end - first), 2) if n > 1 and end > first else None,
            "total_s": round(end - req.submitted, 4)})

    def _fail(self, rows: list, error: Exception) -> None:
        logging.exception("decoding failed for %d request(s)", len(rows))
        self.stats["errors"] += 1
        message = f"decoding failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}" \
            if str(error) else f"decoding failed: {type(error).__name__}"
        for row in rows:
            if not row.done:
                row.done = True
                row.request.emit({"type": "error", "message": message})
