"""The gRPC channel of SFPrompt's body service (https://arxiv.org/abs/2407.17533): server and client.

Per batch a client sends h = head(x; p) and gets z = body(h), then sends ∂L/∂z and gets ∂L/∂h =
J_body(h)ᵀ ∂L/∂z (docs: algorithms.md, "SFPrompt"). The model math is injected as a :class:`BodyCompute`;
this module moves tensors, checks them and keeps the per-step state between Forward and Backward.

What the channel guarantees (docs: reliability.md, "gRPC channels (split learning)"):

- mutual TLS: the server presents its certificate and accepts only client certificates signed by the
  deployment's CA (:mod:`pollinate.methods.sfprompt.credentials`); there is no plaintext mode;
- every tensor is checked before anything else happens (dtype float32, shape [batch, seq, hidden],
  finite, within the byte limit): INVALID_ARGUMENT or RESOURCE_EXHAUSTED otherwise, state unchanged;
  gRPC's message limits sit at 1.25× the largest tensor, so an oversized message is refused early and the
  channel stays usable;
- a step is named (session, round, step); a retried step gets the cached answer and is computed once, even
  while the first attempt is still running; (round, step) must not go back past a step the server has
  dropped (FAILED_PRECONDITION), so a dropped step is never computed again either;
- a session belongs to the client certificate that opened it (PERMISSION_DENIED for any other);
- a session holds at most ``max_steps`` steps and the server at most ``max_sessions`` sessions; a session
  is freed by End, or after ``session_timeout`` seconds without a call (a background reaper);
- the client puts a deadline on every call (not keepalive) and retries UNAVAILABLE and DEADLINE_EXCEEDED
  with the same step id.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
import torch

from pollinate.methods.sfprompt import split_pb2, split_pb2_grpc

DTYPE = torch.float32
"""The one dtype activations and gradients travel in."""
MESSAGE_SLACK = 1.25
"""gRPC message limits = 1.25 × the largest tensor (+ a few KiB for ids when tensors are tiny)."""
MAX_SESSION_ID = 128
REPLAY_KEPT = 32
"""Forward requests a client keeps until their Backward, to replay one the server lost."""
_LE = {torch.float32: "<f4", torch.float16: "<f2", torch.float64: "<f8"}  # the wire is little-endian
_WIRE = {torch.float32: split_pb2.FLOAT32, torch.float16: split_pb2.FLOAT16,
         torch.bfloat16: split_pb2.BFLOAT16, torch.float64: split_pb2.FLOAT64, torch.bool: split_pb2.BOOL}
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
Key = tuple[int, int]
"""(round, step): ordered, so "older than every step still held" is one comparison."""
T = TypeVar("T")


class BodyCompute(Protocol):
    """The frozen body; the service calls it from one thread at a time.

    ``mask`` is the [batch, seq] bool padding mask a client sent with h (None: it sent none), passed on
    unchanged to both calls of a step.
    """

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """z = body(h), [batch, seq, hidden] -> [batch, seq, hidden]; changes nothing."""
        ...

    def backward(self, h: torch.Tensor, grad_z: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """∂L/∂h = J_body(h)ᵀ grad_z, the shape of h; changes nothing."""
        ...


@dataclass(frozen=True)
class Traffic:
    """Tensor bytes of answered calls, seen from whoever counts: activations, gradients and padding masks,
    not gRPC framing. A retry answered from the cache counts again (its bytes travelled again)."""

    received: int = 0
    sent: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.received + other.received, self.sent + other.sent)


@dataclass(frozen=True)
class BodyLimits:
    """What the body service accepts and holds."""

    hidden_size: int
    """d: the last axis of every h, z, ∂L/∂z and ∂L/∂h."""
    max_tensor_bytes: int = 16 << 20
    """The largest tensor, 4·b·T·d bytes (16 MiB: b=8, T=512, d=1024)."""
    max_batch: int | None = None
    """The largest batch axis, or None for any that fits max_tensor_bytes."""
    max_seq: int | None = None
    """The longest sequence axis (prompt tokens included), or None for any that fits max_tensor_bytes."""
    max_steps: int = 4
    """Steps one session holds: each awaiting its Backward keeps h and z (2 tensors), each answered one
    keeps ∂L/∂h for a retry until a newer step needs the room. A client that does Forward, Backward, next
    needs 1; pipelining needs one per step in flight."""
    max_sessions: int = 32
    """Sessions held at once; a new one beyond that is refused with RESOURCE_EXHAUSTED. The server holds
    at most max_sessions × max_steps × 2 × max_tensor_bytes of tensors (4 GiB with the defaults)."""
    session_timeout: float = 300.0
    """Seconds without a call after which a session is freed (its client is taken for gone)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "max_tensor_bytes", "max_steps", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; give 1 or more")
        for name in ("max_batch", "max_seq"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: {value} is not allowed; give 1 or more, or None for no limit")
        if not self.session_timeout > 0:
            raise ValueError(f"session_timeout: {self.session_timeout} is not allowed; give seconds > 0")

    @property
    def message_bytes(self) -> int:
        """gRPC's receive and send limit."""
        return message_limit(self.max_tensor_bytes)


def message_limit(max_tensor_bytes: int) -> int:
    """1.25 × the largest tensor, plus 4 KiB for the ids and framing of tiny tensors."""
    return int(MESSAGE_SLACK * max_tensor_bytes) + 4096


# ---- tensors on the wire ----


class Rejected(Exception):
    """A request the service refuses: the gRPC status and the one-line reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_tensor(t: torch.Tensor) -> split_pb2.Tensor:
    """A CPU copy of ``t`` as a wire tensor (little-endian, row-major)."""
    if t.dtype not in _WIRE:
        raise ValueError(f"tensor dtype {t.dtype} cannot travel; use {DTYPE}")
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move its bits as int16
        data = t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    elif t.dtype == torch.bool:
        data = t.numpy().tobytes()  # one byte each, 0 or 1
    else:
        data = t.numpy().astype(_LE[t.dtype], copy=False).tobytes()
    return split_pb2.Tensor(dtype=_WIRE[t.dtype], shape=list(t.shape), data=data)


def decode_activation(msg: split_pb2.Tensor, limits: BodyLimits, name: str) -> torch.Tensor:
    """A checked float32 [batch, seq, hidden] tensor, or :class:`Rejected` naming what is wrong."""
    shape = _check_header(msg, limits, name)
    array = np.frombuffer(msg.data, dtype="<f4").astype(np.float32)  # one copy, native order, writable
    t = torch.from_numpy(array).reshape(shape)  # [batch, seq, hidden]
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {bad} values are NaN or infinite")
    return t


def decode_mask(request: split_pb2.ForwardRequest, h_shape: torch.Size) -> torch.Tensor | None:
    """The checked [batch, seq] bool padding mask sent with h, or None when none was sent."""
    if not request.HasField("mask"):
        return None
    msg, want = request.mask, list(h_shape[:2])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if msg.dtype != split_pb2.BOOL or list(msg.shape) != want or len(msg.data) != math.prod(want):
        raise Rejected(invalid, f"mask: {_dtype_name(msg.dtype)} {list(msg.shape)} with "
                       f"{len(msg.data)} bytes; send BOOL {want}, one byte each")
    array = np.frombuffer(msg.data, dtype=np.uint8)
    if (array > 1).any():
        raise Rejected(invalid, "mask: a BOOL byte is neither 0 nor 1")
    return torch.from_numpy(array.astype(np.bool_)).reshape(want)  # [batch, seq]


def _check_header(msg: split_pb2.Tensor, limits: BodyLimits, name: str) -> tuple[int, int, int]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if msg.dtype != split_pb2.FLOAT32:
        raise Rejected(invalid, f"{name}: dtype {_dtype_name(msg.dtype)} is not accepted; send FLOAT32")
    shape = tuple(msg.shape)
    if len(shape) != 3 or shape[2] != limits.hidden_size or min(shape) < 1:
        raise Rejected(invalid, f"{name}: shape {list(shape)} is not [batch, seq, {limits.hidden_size}]")
    for axis, size, limit in (("batch", shape[0], limits.max_batch), ("seq", shape[1], limits.max_seq)):
        if limit is not None and size > limit:
            raise Rejected(invalid, f"{name}: {axis} {size} is over the limit of {limit}")
    nbytes = 4 * math.prod(shape)
    if nbytes > limits.max_tensor_bytes:
        raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"{name}: {nbytes} bytes is over the limit of {limits.max_tensor_bytes}")
    if len(msg.data) != nbytes:
        raise Rejected(invalid, f"{name}: {len(msg.data)} data bytes, shape {list(shape)} needs {nbytes}")
    return shape[0], shape[1], shape[2]


def decode_reply(msg: split_pb2.Tensor, name: str) -> torch.Tensor:
    """The client's side: a float32 tensor of any shape whose bytes match it."""
    shape = tuple(msg.shape)
    if msg.dtype != split_pb2.FLOAT32 or len(msg.data) != 4 * math.prod(shape):
        raise ValueError(f"the body service answered a malformed {name}: dtype "
                         f"{_dtype_name(msg.dtype)}, shape {list(shape)}, {len(msg.data)} bytes")
    return torch.from_numpy(np.frombuffer(msg.data, dtype="<f4").astype(np.float32)).reshape(shape)


def _dtype_name(value: int) -> str:
    try:
        return str(split_pb2.DType.Name(value))
    except ValueError:  # proto3 enums are open: any number arrives
        return f"unknown ({value})"


def _digest(*tensors: split_pb2.Tensor) -> bytes:
    """Names a request's tensors, so that a step id reused for different data is caught."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(repr((t.dtype, list(t.shape), len(t.data))).encode())
        digest.update(t.data)
    return digest.digest()


# ---- the server's state ----


@dataclass(eq=False)
class _Step:
    """One (round, step) of a session: pending until its Backward is answered, then answered."""

    shape: tuple[int, ...]
    h: torch.Tensor | None  # [batch, seq, hidden]; dropped once the Backward is answered
    mask: torch.Tensor | None  # [batch, seq] bool, or None: none was sent
    h_digest: bytes
    forward: futures.Future[split_pb2.Tensor] | None  # z; dropped once the Backward is answered
    grad_digest: bytes = b""
    backward: futures.Future[split_pb2.Tensor] | None = None  # ∂L/∂h, kept for a retried Backward

    @property
    def answered(self) -> bool:
        return self.forward is None

    def held_bytes(self) -> int:
        held = [f.result() for f in (self.forward, self.backward) if f is not None and _succeeded(f)]
        inputs = [t for t in (self.h, self.mask) if t is not None]
        return sum(len(t.data) for t in held) + sum(t.numel() * t.element_size() for t in inputs)


@dataclass(eq=False)
class _Session:
    owner: str  # the client certificate's common name
    last_seen: float
    steps: OrderedDict[Key, _Step] = field(default_factory=OrderedDict)
    floor: Key | None = None  # the newest step dropped: it and older ones are never computed again
    active: int = 0  # calls in progress: the reaper leaves the session alone


def _succeeded(f: futures.Future[Any]) -> bool:
    return f.done() and not f.cancelled() and f.exception() is None


class _State:
    """Sessions, their steps and the traffic ledger, behind one lock; compute runs outside it."""

    def __init__(self, limits: BodyLimits, traffic_history: int = 4096) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.sessions: dict[str, _Session] = {}
        self.ledger: OrderedDict[str, dict[int, Traffic]] = OrderedDict()  # outlives sessions
        self.traffic_history = traffic_history

    def enter(self, session_id: str, owner: str, create: bool) -> _Session:
        """The session for one call (marked active until :meth:`leave`)."""
        if not 0 < len(session_id) <= MAX_SESSION_ID:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"session_id: {len(session_id)} characters; give 1 to {MAX_SESSION_ID}")
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                session = self._create(session_id, owner, create)
            elif session.owner != owner:
                raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                               f"session {session_id!r} belongs to another client")
            session.active += 1
            session.last_seen = time.monotonic()
            return session

    def _create(self, session_id: str, owner: str, create: bool) -> _Session:
        if not create:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r} (ended, timed out, or the "
                           "server restarted); send the step's Forward again")
        if len(self.sessions) >= self.limits.max_sessions:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the server holds {len(self.sessions)} sessions, its limit; try again later")
        session = self.sessions[session_id] = _Session(owner, time.monotonic())
        return session

    def leave(self, session: _Session) -> None:
        with self.lock:
            session.active -= 1
            session.last_seen = time.monotonic()

    def claim_forward(self, session: _Session, key: Key, h: torch.Tensor, mask: torch.Tensor | None,
                      digest: bytes) -> tuple[_Step, bool]:
        """The step's entry, and whether this call computes it (False: a retry, which waits for it)."""
        with self.lock:
            step = session.steps.get(key)
            if step is not None:
                if step.h_digest != digest:
                    raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"step {key} was sent before with a different h or mask; use a new "
                                   "step id")
                if step.answered:
                    raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"step {key} has had its Backward already; use a new step id")
                return step, False
            self._check_new(session, key)
            step = session.steps[key] = _Step(tuple(h.shape), h, mask, digest, futures.Future())
            return step, True

    def _check_new(self, session: _Session, key: Key) -> None:
        if session.floor is not None and key <= session.floor:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, f"step {key} is not newer than step "
                           f"{session.floor}, whose result was dropped; step ids must increase")
        if len(session.steps) < self.limits.max_steps:
            return
        oldest = next((k for k, s in session.steps.items() if s.answered), None)
        if oldest is None:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{len(session.steps)} steps await their Backward (the limit); send those first")
        del session.steps[oldest]
        session.floor = max(oldest, session.floor) if session.floor is not None else oldest

    def claim_backward(self, session: _Session, key: Key, grad_z: torch.Tensor,
                       digest: bytes) -> tuple[_Step, bool]:
        """The step's entry, and whether this call computes its Backward."""
        with self.lock:
            step = session.steps.get(key)
            if step is None:
                if session.floor is not None and key <= session.floor:
                    raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"step {key} was answered and dropped long ago")
                raise Rejected(grpc.StatusCode.NOT_FOUND,
                               f"no Forward of step {key} is held; send the step's Forward again")
            if tuple(grad_z.shape) != step.shape:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"grad_z: shape {list(grad_z.shape)}, step {key}'s z has {list(step.shape)}")
            if step.backward is not None:
                if step.grad_digest != digest:
                    raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"step {key} had its Backward with a different grad_z")
                return step, False
            if step.forward is None or not _succeeded(step.forward):
                raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, f"step {key}'s Forward is still running")
            step.backward, step.grad_digest = futures.Future(), digest
            return step, True

    def undo_forward(self, session: _Session, key: Key) -> None:
        with self.lock:
            session.steps.pop(key, None)

    def undo_backward(self, step: _Step) -> None:
        with self.lock:
            step.backward, step.grad_digest = None, b""

    def finish_backward(self, step: _Step) -> None:
        with self.lock:
            step.h, step.mask, step.forward = None, None, None  # only ∂L/∂h stays, for a retried Backward

    def count(self, session_id: str, round_: int, received: int, sent: int) -> None:
        with self.lock:
            rounds = self.ledger.setdefault(session_id, {})
            rounds[round_] = rounds.get(round_, Traffic()) + Traffic(received, sent)
            self.ledger.move_to_end(session_id)
            while len(self.ledger) > self.traffic_history:
                self.ledger.popitem(last=False)

    def traffic(self, session_id: str, round_: int | None = None) -> Traffic:
        with self.lock:
            rounds = self.ledger.get(session_id, {})
            if round_ is not None:
                return rounds.get(round_, Traffic())
            return sum(rounds.values(), Traffic())

    def end(self, session_id: str, owner: str) -> None:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None and session.owner != owner:
                raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                               f"session {session_id!r} belongs to another client")
            self.sessions.pop(session_id, None)

    def reap(self) -> list[str]:
        """Free every session idle for longer than the timeout; their ids."""
        now = time.monotonic()
        with self.lock:
            gone = [sid for sid, s in self.sessions.items()
                    if s.active == 0 and now - s.last_seen > self.limits.session_timeout]
            for sid in gone:
                del self.sessions[sid]
            return gone


# ---- the server ----


class _Servicer(split_pb2_grpc.BodyServicer):
    """The Body service: checks, then the state machine of :class:`_State`, then the compute."""

    def __init__(self, compute: BodyCompute, state: _State) -> None:
        self.compute = compute
        self.state = state
        self.compute_lock = threading.Lock()  # the compute is called from one thread at a time

    def Forward(self, request: split_pb2.ForwardRequest, context: Any) -> split_pb2.ForwardReply:
        return split_pb2.ForwardReply(z=_answer(context, lambda: self._forward(request, context)))

    def Backward(self, request: split_pb2.BackwardRequest, context: Any) -> split_pb2.BackwardReply:
        return split_pb2.BackwardReply(grad_h=_answer(context, lambda: self._backward(request, context)))

    def End(self, request: split_pb2.EndRequest, context: Any) -> split_pb2.EndReply:
        def end() -> Traffic:
            self.state.end(request.session_id, _peer(context))
            return self.state.traffic(request.session_id)

        total = _answer(context, end)
        return split_pb2.EndReply(bytes_received=total.received, bytes_sent=total.sent)

    def _forward(self, request: split_pb2.ForwardRequest, context: Any) -> split_pb2.Tensor:
        h = decode_activation(request.h, self.state.limits, "h")  # nothing changes before these pass
        mask = decode_mask(request, h.shape)
        key = (request.round, request.step)
        session = self.state.enter(request.session_id, _peer(context), create=True)
        try:
            digest = _digest(request.h, request.mask)
            step, mine = self.state.claim_forward(session, key, h, mask, digest)
            assert step.forward is not None
            if mine:
                self._run(step.forward, lambda: self._checked(self.compute.forward(h, mask), h, "z"),
                          undo=lambda: self.state.undo_forward(session, key))
            z = _wait(step.forward, context)
        finally:
            self.state.leave(session)
        received = len(request.h.data) + len(request.mask.data)
        self.state.count(request.session_id, request.round, received, len(z.data))
        return z

    def _backward(self, request: split_pb2.BackwardRequest, context: Any) -> split_pb2.Tensor:
        grad_z = decode_activation(request.grad_z, self.state.limits, "grad_z")
        key = (request.round, request.step)
        session = self.state.enter(request.session_id, _peer(context), create=False)
        try:
            step, mine = self.state.claim_backward(session, key, grad_z, _digest(request.grad_z))
            assert step.backward is not None
            if mine:
                h, mask = step.h, step.mask
                assert h is not None
                self._run(step.backward,
                          lambda: self._checked(self.compute.backward(h, grad_z, mask), h, "grad_h"),
                          undo=lambda: self.state.undo_backward(step))
                self.state.finish_backward(step)
            grad_h = _wait(step.backward, context)
        finally:
            self.state.leave(session)
        self.state.count(request.session_id, request.round, len(request.grad_z.data), len(grad_h.data))
        return grad_h

    def _run(self, future: futures.Future[split_pb2.Tensor], work: Callable[[], split_pb2.Tensor],
             undo: Callable[[], None]) -> None:
        """Compute a step's answer into ``future``; on failure the step is as if never asked."""
        try:
            with self.compute_lock:
                result = work()
        except Exception as error:
            undo()
            future.set_exception(error)
            raise _body_failed(error) from None
        future.set_result(result)

    @staticmethod
    def _checked(out: torch.Tensor, h: torch.Tensor, name: str) -> split_pb2.Tensor:
        if out.dtype != DTYPE or out.shape != h.shape:
            raise TypeError(f"{name} is {out.dtype} {list(out.shape)}, expected {DTYPE} {list(h.shape)}")
        return encode_tensor(out)


def _answer(context: Any, work: Callable[[], T]) -> T:
    """``work()``, or the call aborted with the status a :class:`Rejected` names."""
    try:
        return work()
    except Rejected as rejected:
        _abort(context, rejected)


def _abort(context: Any, rejected: Rejected) -> NoReturn:
    context.abort(rejected.code, str(rejected))
    raise AssertionError("context.abort returned")  # it raises; this keeps the types honest


def _wait(future: futures.Future[split_pb2.Tensor], context: Any) -> split_pb2.Tensor:
    """A step's answer, computed by this call or by an earlier attempt still running."""
    try:
        return future.result(timeout=context.time_remaining())
    except TimeoutError:
        raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, "the step is still being computed") from None
    except Exception as error:
        raise _body_failed(error) from None


def _body_failed(error: Exception) -> Rejected:
    return Rejected(grpc.StatusCode.INTERNAL, f"the body failed: {type(error).__name__}: {error}")


def _peer(context: Any) -> str:
    """Who is calling: the client certificate's common name (mutual TLS makes it present)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else str(context.peer())


class BodyService:
    """A running body service: its port, what it holds, the traffic per session and round; ``stop()``."""

    def __init__(self, server: Any, host: str, port: int, state: _State) -> None:
        self.host, self.port = host, port
        self._server, self._state = server, state
        self._stopped = threading.Event()
        period = min(1.0, state.limits.session_timeout / 4)  # a session lives at most timeout + period idle
        self._reaper = threading.Thread(target=self._reap, args=(period,), name="body-reaper", daemon=True)
        self._reaper.start()

    @property
    def address(self) -> str:
        """``host:port``, what a client on this machine dials (the server certificate must name the host)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def limits(self) -> BodyLimits:
        return self._state.limits

    def sessions(self) -> list[str]:
        """The sessions held now."""
        with self._state.lock:
            return sorted(self._state.sessions)

    def held_steps(self, session_id: str) -> list[Key]:
        """The (round, step) entries a session holds, oldest first ([] when it holds none)."""
        with self._state.lock:
            session = self._state.sessions.get(session_id)
            return list(session.steps) if session is not None else []

    def held_bytes(self) -> int:
        """Tensor bytes held for all sessions (h and z of pending steps, ∂L/∂h of answered ones)."""
        with self._state.lock:
            return sum(s.held_bytes() for session in self._state.sessions.values()
                       for s in session.steps.values())

    def traffic(self, session_id: str, round: int | None = None) -> Traffic:
        """Tensor bytes received from and sent to a session, in one round or all (kept after it ends)."""
        return self._state.traffic(session_id, round)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, cancel the running ones after ``grace`` seconds, stop the reaper."""
        self._stopped.set()
        self._server.stop(grace).wait()
        self._reaper.join()

    def __enter__(self) -> BodyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _reap(self, period: float) -> None:
        while not self._stopped.wait(period):
            self._state.reap()


def start_body_service(compute: BodyCompute, *, hidden_size: int, credentials: grpc.ServerCredentials,
                       host: str = "127.0.0.1", port: int = 0, max_tensor_bytes: int = 16 << 20,
                       max_batch: int | None = None, max_seq: int | None = None, max_steps: int = 4,
                       max_sessions: int = 32, session_timeout: float = 300.0,
                       workers: int = 8) -> BodyService:
    """Serve ``compute`` on ``host:port`` (0: any free port) over mutual TLS; see :class:`BodyLimits`.

    ``credentials`` come from :func:`pollinate.methods.sfprompt.credentials.server_credentials`; there is
    no plaintext mode. ``workers`` threads answer calls (a retry waiting for its first attempt holds one).
    """
    if credentials is None:
        raise ValueError("credentials: the body service runs over mutual TLS only; give "
                         "credentials.server_credentials(CERT_FOLDER)")
    limits = BodyLimits(hidden_size, max_tensor_bytes, max_batch, max_seq, max_steps, max_sessions,
                        session_timeout)
    options = [("grpc.max_receive_message_length", limits.message_bytes),
               ("grpc.max_send_message_length", limits.message_bytes),
               ("grpc.so_reuseport", 0)]  # a taken port is an error, not a second server beside it
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="body"),
                         options=options, maximum_concurrent_rpcs=4 * workers)
    state = _State(limits)
    split_pb2_grpc.add_BodyServicer_to_server(_Servicer(compute, state), server)
    bound = _bind(server, host, port, credentials)
    server.start()
    return BodyService(server, host, bound, state)


def _bind(server: Any, host: str, port: int, credentials: grpc.ServerCredentials) -> int:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = int(server.add_secure_port(target, credentials))
    except RuntimeError as error:
        raise OSError(f"the body service could not listen on {target}: {error}") from None
    if bound == 0:
        raise OSError(f"the body service could not listen on {target} (in use, or not an address here)")
    return bound


# ---- the client ----


class BodyClient:
    """One client's session with a body service: ``forward`` and ``backward`` per step, then ``close``.

    Every call carries a deadline of ``deadline_s`` seconds. UNAVAILABLE and DEADLINE_EXCEEDED are retried
    ``retries`` times (backoff ``backoff_s``·2^i) with the same ids, which the server answers from its
    cache, so a retry never computes a step twice. Until the first answer from the server UNAVAILABLE is
    not retried: a refused TLS handshake (wrong certificate) fails at once. If the server no longer holds
    a step's Forward when its Backward comes (it restarted, or timed the session out), the client sends
    that Forward again and then the Backward. Errors reach the caller as :class:`grpc.RpcError`. One
    thread per client.
    """

    def __init__(self, address: str, credentials: grpc.ChannelCredentials, deadline_s: float, session_id: str,
                 max_tensor_bytes: int, *, retries: int = 3, backoff_s: float = 0.1,
                 server_name: str | None = None) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: {deadline_s} is not allowed; give seconds > 0")
        if not 0 < len(session_id) <= MAX_SESSION_ID:
            raise ValueError(f"session_id: {session_id!r} is not allowed; give 1 to {MAX_SESSION_ID} "
                             "characters")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries {retries}, backoff_s {backoff_s}: give 0 or more of each")
        if max_tensor_bytes < 1:
            raise ValueError(f"max_tensor_bytes: {max_tensor_bytes} is not allowed; give 1 or more")
        self.session_id, self.deadline_s = session_id, deadline_s
        self.retries, self.backoff_s = retries, backoff_s
        limit = message_limit(max_tensor_bytes)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            # reconnect soon after a server restart (gRPC's default waits 1 s, then longer)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]
        if server_name:  # the name the server certificate carries, when dialling an address it lacks
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = split_pb2_grpc.BodyStub(self._channel)
        self._answered = False  # has the server answered anything yet (TLS and all)?
        self._awaiting: OrderedDict[Key, split_pb2.ForwardRequest] = OrderedDict()  # to replay a Forward
        self._traffic: dict[int, Traffic] = {}
        self._closed = False

    def forward(self, round: int, step: int, h: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """z = body(h) for step ``step`` of ``round``; h is [batch, seq, hidden] float32.

        ``mask`` is the [batch, seq] padding mask (true at real positions) for a body that needs it; it is
        sent as bool, B·S bytes.
        """
        request = split_pb2.ForwardRequest(session_id=self.session_id, round=round, step=step,
                                           h=encode_tensor(h))
        if mask is not None:
            request.mask.CopyFrom(encode_tensor(mask.bool()))
        reply = self._call(self._stub.Forward, request)
        self._count(round, request.h, reply.z, request.mask)
        self._awaiting[(round, step)] = request
        while len(self._awaiting) > REPLAY_KEPT:  # a step never given its Backward
            self._awaiting.popitem(last=False)
        return decode_reply(reply.z, "z")

    def backward(self, round: int, step: int, grad_z: torch.Tensor) -> torch.Tensor:
        """∂L/∂h for the step whose Forward gave z, from grad_z = ∂L/∂z (the shape of z)."""
        key = (round, step)
        request = split_pb2.BackwardRequest(session_id=self.session_id, round=round, step=step,
                                            grad_z=encode_tensor(grad_z))
        try:
            reply = self._call(self._stub.Backward, request)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or key not in self._awaiting:
                raise
            forward = self._awaiting[key]  # the server lost the step: replay its Forward, same ids
            self._count(round, forward.h, self._call(self._stub.Forward, forward).z, forward.mask)
            reply = self._call(self._stub.Backward, request)
        self._awaiting.pop(key, None)
        self._count(round, reply.grad_h, request.grad_z)
        return decode_reply(reply.grad_h, "grad_h")

    def traffic(self, round: int | None = None) -> Traffic:
        """Tensor bytes sent and received in answered calls, in one round or all."""
        if round is not None:
            return self._traffic.get(round, Traffic())
        return sum(self._traffic.values(), Traffic())

    @property
    def bytes_sent(self) -> int:
        return self.traffic().sent

    @property
    def bytes_received(self) -> int:
        return self.traffic().received

    def close(self) -> None:
        """Tell the server the session is over (best effort, short deadline), then close the channel."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._answered:
                self._stub.End(split_pb2.EndRequest(session_id=self.session_id),
                               timeout=min(self.deadline_s, 1.0))
        except grpc.RpcError:
            pass  # the server frees the session after its timeout anyway
        finally:
            self._channel.close()

    def __enter__(self) -> BodyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        for attempt in range(self.retries + 1):
            try:
                reply = method(request, timeout=self.deadline_s)
                self._answered = True
                return reply
            except grpc.RpcError as error:
                code = error.code()
                if code not in _RETRIED:
                    self._answered = True  # the server answered (with an error)
                refused = code == grpc.StatusCode.UNAVAILABLE and not self._answered  # TLS, or no server
                if code not in _RETRIED or attempt == self.retries or refused:
                    raise
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _count(self, round: int, out: split_pb2.Tensor, back: split_pb2.Tensor,
               mask: split_pb2.Tensor | None = None) -> None:
        """One answered call: ``out`` (and ``mask``) went to the server, ``back`` came from it."""
        sent = len(out.data) + (len(mask.data) if mask is not None else 0)
        self._traffic[round] = self._traffic.get(round, Traffic()) + Traffic(len(back.data), sent)
