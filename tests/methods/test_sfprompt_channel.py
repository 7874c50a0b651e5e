"""The body service's gRPC channel on loopback with mutual TLS (reliability.md, scenarios 15-18).

The body is a frozen two-layer tanh MLP behind the :class:`BodyCompute` protocol: the channel is under
test, not the model. Run with ``-s`` to see the measured refusal times and deadline accuracy.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from torch import nn

from pollinate.deploy.certs import CertFolder
from pollinate.methods.sfprompt import split_pb2, split_pb2_grpc
from pollinate.methods.sfprompt.channel import (
    BodyClient,
    BodyService,
    Traffic,
    encode_tensor,
    message_limit,
    start_body_service,
)
from pollinate.methods.sfprompt.credentials import client_credentials, server_credentials, temporary_certs

ROOT = Path(__file__).resolve().parents[2]
D, B, T = 16, 2, 5  # hidden size, batch, sequence
TENSOR = 4 * B * T * D  # bytes of one h, z, ∂L/∂z or ∂L/∂h
LIMIT = 4 * 4 * 8 * D  # the service's largest tensor: batch 4 × seq 8
Code = grpc.StatusCode


class TinyBody:
    """z = (W2 tanh(W1 h + b1) + b2) at real positions, 0 at padding ones; frozen; counts its calls."""

    def __init__(self, sleep: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).requires_grad_(False)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.sleep = sleep
        self.fail = False
        self.forward_calls = self.backward_calls = 0

    def run(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        z = self.net(h)  # [B, T, D]
        return z if mask is None else z * mask[..., None]  # mask [B, T]

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.forward_calls += 1
        time.sleep(self.sleep)
        if self.fail:
            raise RuntimeError("out of memory")
        with torch.no_grad():
            return self.run(h, mask)

    def backward(self, h: torch.Tensor, grad_z: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        self.backward_calls += 1
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(True)
            (grad_h,) = torch.autograd.grad(self.run(leaf, mask), leaf, grad_z)
        return grad_h


@pytest.fixture(scope="module")
def certs() -> Iterator[CertFolder]:
    with temporary_certs(nodes=2) as folder:
        yield folder


@pytest.fixture(scope="module")
def rogue() -> Iterator[CertFolder]:
    with temporary_certs() as folder:
        yield folder


@pytest.fixture
def serve(certs: CertFolder) -> Iterator[Callable[..., tuple[BodyService, TinyBody]]]:
    """Start services (stopped after the test): ``serve(sleep=..., session_timeout=..., ...)``."""
    running: list[BodyService] = []

    def start(sleep: float = 0.0, **limits: Any) -> tuple[BodyService, TinyBody]:
        body = TinyBody(sleep)
        options = {"max_tensor_bytes": LIMIT, "session_timeout": 30.0, **limits}
        service = start_body_service(body, hidden_size=D, credentials=server_credentials(certs), **options)
        running.append(service)
        return service, body

    yield start
    for service in running:
        service.stop(grace=0)


def client(service: BodyService, certs: CertFolder, session: str = "s1", node: str = "node-1",
           **options: Any) -> BodyClient:
    options = {"deadline_s": 5.0, "max_tensor_bytes": LIMIT, **options}
    return BodyClient(service.address, client_credentials(certs, node), session_id=session, **options)


def activations(seed: int = 1, shape: tuple[int, ...] = (B, T, D)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def snapshot(service: BodyService, body: TinyBody) -> tuple[object, ...]:
    """Everything a refused request must leave as it was."""
    sessions = service.sessions()
    return (sessions, [service.held_steps(s) for s in sessions], service.held_bytes(),
            [service.traffic(s) for s in sessions], body.forward_calls, body.backward_calls)


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, float]:
    """The status code, details and seconds of a call that must fail."""
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details(), time.perf_counter() - start


def send_raw(service: BodyService, certs: CertFolder, request: split_pb2.ForwardRequest) -> tuple[Any, str]:
    """A hand-made Forward request that must fail (BodyClient makes only well-formed ones): its status."""
    with grpc.secure_channel(service.address, client_credentials(certs, "node-1")) as channel:
        code, details, _ = status(lambda: split_pb2_grpc.BodyStub(channel).Forward(request, timeout=5.0))
    return code, details


def raw_request(h: split_pb2.Tensor, mask: split_pb2.Tensor | None = None) -> split_pb2.ForwardRequest:
    return split_pb2.ForwardRequest(session_id="s1", round=0, step=1, h=h, mask=mask)


# ---- results ----


def test_forward_and_backward_equal_the_body(serve: Callable[..., tuple[BodyService, TinyBody]],
                                             certs: CertFolder) -> None:
    service, body = serve()
    reference = TinyBody()
    with client(service, certs) as c:
        for step in range(3):
            h, grad_z = activations(step), activations(100 + step)
            assert torch.equal(c.forward(0, step, h), reference.forward(h))
            assert torch.equal(c.backward(0, step, grad_z), reference.backward(h, grad_z))
    assert (body.forward_calls, body.backward_calls) == (3, 3)
    assert service.sessions() == []  # close() ended the session


def test_byte_counters_count_the_tensor_bytes(serve: Callable[..., tuple[BodyService, TinyBody]],
                                              certs: CertFolder) -> None:
    service, _ = serve()
    c = client(service, certs)
    for rnd, steps in ((0, 2), (1, 3)):
        for step in range(steps):
            c.forward(rnd, step, activations(step))
            c.backward(rnd, step, activations(step + 50))
    # per step: h and ∂L/∂z up, z and ∂L/∂h down, 4·b·T·d bytes each
    assert c.traffic(0) == Traffic(received=2 * 2 * TENSOR, sent=2 * 2 * TENSOR)
    assert c.traffic(1) == Traffic(received=3 * 2 * TENSOR, sent=3 * 2 * TENSOR)
    assert (c.bytes_sent, c.bytes_received) == (5 * 2 * TENSOR, 5 * 2 * TENSOR)
    assert service.traffic("s1", 0) == Traffic(received=2 * 2 * TENSOR, sent=2 * 2 * TENSOR)
    assert service.traffic("s1") == Traffic(received=5 * 2 * TENSOR, sent=5 * 2 * TENSOR)
    c.close()
    assert service.traffic("s1") == Traffic(received=5 * 2 * TENSOR, sent=5 * 2 * TENSOR)  # outlives End


def test_a_padding_mask_travels_with_h(serve: Callable[..., tuple[BodyService, TinyBody]],
                                       certs: CertFolder) -> None:
    service, body = serve()
    h, grad_z = activations(), activations(6)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # the second example is padded after 3 tokens
    reference = TinyBody()
    with client(service, certs) as c:
        z = c.forward(0, 0, h, mask)
        assert torch.equal(z, reference.forward(h, mask.bool())) and not z[1, 3:].any()
        assert torch.equal(c.backward(0, 0, grad_z), reference.backward(h, grad_z, mask.bool()))
        assert c.traffic(0) == Traffic(received=2 * TENSOR, sent=2 * TENSOR + B * T)  # B·T mask bytes
        assert service.traffic("s1", 0) == Traffic(received=2 * TENSOR + B * T, sent=2 * TENSOR)
        before = snapshot(service, body)
        for bad in (mask[:, :-1], torch.full((B, T), 2)):  # one position short; a byte that is not 0/1
            data = bad.to(torch.uint8).numpy().tobytes()
            bad_mask = split_pb2.Tensor(dtype=split_pb2.BOOL, shape=bad.shape, data=data)
            code, details = send_raw(service, certs, raw_request(encode_tensor(h), bad_mask))
            assert code == Code.INVALID_ARGUMENT and details.startswith("mask: "), details
        assert snapshot(service, body) == before


# ---- mutual TLS (scenario 15) ----


def expired_client(certs: CertFolder) -> grpc.ChannelCredentials:
    """A client certificate the deployment's CA signed, valid until yesterday (certs.py makes none)."""
    ca = x509.load_pem_x509_certificate(certs.ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_channel_credentials(certs.ca_crt.read_bytes(), key_pem,
                                        cert.public_bytes(serialization.Encoding.PEM))


def bad_credentials(case: str, certs: CertFolder, rogue: CertFolder) -> grpc.ChannelCredentials:
    node, rogue_node = certs.node("node-1"), rogue.node("node-1")
    if case == "no client certificate":
        return grpc.ssl_channel_credentials(certs.ca_crt.read_bytes())
    if case == "client certificate from a rogue CA":
        return grpc.ssl_channel_credentials(certs.ca_crt.read_bytes(), rogue_node.tls_key.read_bytes(),
                                            rogue_node.tls_crt.read_bytes())
    if case == "expired client certificate":
        return expired_client(certs)
    assert case == "client trusts the wrong server CA"
    return grpc.ssl_channel_credentials(rogue.ca_crt.read_bytes(), node.tls_key.read_bytes(),
                                        node.tls_crt.read_bytes())


@pytest.mark.parametrize("case", ["no client certificate", "client certificate from a rogue CA",
                                  "expired client certificate", "client trusts the wrong server CA",
                                  "plaintext"])
def test_bad_certificates_are_refused_quickly(case: str, serve: Callable[..., tuple[BodyService, TinyBody]],
                                              certs: CertFolder, rogue: CertFolder) -> None:
    service, body = serve()
    h = activations()
    if case == "plaintext":  # BodyClient has no plaintext mode: a bare gRPC channel
        channel = grpc.insecure_channel(service.address)
        stub = split_pb2_grpc.BodyStub(channel)
        request = split_pb2.ForwardRequest(session_id="s1", round=0, step=0, h=encode_tensor(h))
        code, details, seconds = status(lambda: stub.Forward(request, timeout=5.0))
        channel.close()
    else:
        bad = BodyClient(service.address, bad_credentials(case, certs, rogue), 5.0, "s1", LIMIT)
        code, details, seconds = status(lambda: bad.forward(0, 0, h))
        bad.close()
    print(f"\n[refusal] {case}: {code.name} in {1000 * seconds:.1f} ms ({details})")
    assert code == Code.UNAVAILABLE
    assert seconds < 0.5  # measured 1-15 ms; the pass figure is 100 ms, this leaves room on a busy machine
    assert (service.sessions(), body.forward_calls) == ([], 0)
    with client(service, certs) as good:  # a valid client is unaffected
        assert torch.equal(good.forward(0, 0, h), TinyBody().forward(h))


# ---- bad tensors (scenario 17) ----


def test_oversized_tensors_are_refused_and_the_channel_stays_usable(
        serve: Callable[..., tuple[BodyService, TinyBody]], certs: CertFolder) -> None:
    service, body = serve()
    c = client(service, certs, max_tensor_bytes=8 * LIMIT)  # a client that allows itself more
    c.forward(0, 0, activations())
    before = snapshot(service, body)
    huge = activations(shape=(8, 16, D))  # 8 KiB: over gRPC's receive limit on the server
    assert 4 * huge.numel() > message_limit(LIMIT)
    code, details, _ = status(lambda: c.forward(0, 1, huge))
    assert code == Code.RESOURCE_EXHAUSTED, details
    over = activations(shape=(5, 8, D))  # within the message limit, over max_tensor_bytes
    assert LIMIT < 4 * over.numel() <= message_limit(LIMIT)
    code, details, _ = status(lambda: c.forward(0, 1, over))
    assert code == Code.RESOURCE_EXHAUSTED and "over the limit" in details, details
    assert snapshot(service, body) == before
    c.backward(0, 0, activations(2))
    assert torch.equal(c.forward(0, 1, activations(3)), TinyBody().forward(activations(3)))
    c.close()


BAD_H = {
    "NaN": lambda: encode_tensor(activations().index_put_((torch.tensor(0),), torch.tensor(float("nan")))),
    "Inf": lambda: encode_tensor(torch.full((B, T, D), float("inf"))),
    "float64": lambda: encode_tensor(activations().double()),
    "bfloat16": lambda: encode_tensor(activations().bfloat16()),
    "wrong hidden size": lambda: encode_tensor(activations(shape=(B, T, D + 1))),
    "two axes": lambda: encode_tensor(activations(shape=(B * T, D))),
    "empty batch": lambda: encode_tensor(activations(shape=(0, T, D))),
    "bytes short of the shape": lambda: split_pb2.Tensor(dtype=split_pb2.FLOAT32, shape=[B, T, D],
                                                         data=b"\0" * (TENSOR - 4)),
    "no tensor": lambda: split_pb2.Tensor(),
    "unknown dtype": lambda: split_pb2.Tensor(dtype=99, shape=[B, T, D], data=b"\0" * TENSOR),  # type: ignore[arg-type]
}


def test_invalid_tensors_are_refused_and_change_nothing(serve: Callable[..., tuple[BodyService, TinyBody]],
                                                        certs: CertFolder) -> None:
    service, body = serve()
    with client(service, certs) as c:
        c.forward(0, 0, activations())
        before = snapshot(service, body)
        for name, make in BAD_H.items():
            code, details = send_raw(service, certs, raw_request(make()))
            assert code == Code.INVALID_ARGUMENT, (name, details)
            assert details.startswith("h: "), details
        for bad_grad in (torch.full((B, T, D), float("nan")), activations(shape=(B, T + 1, D))):
            code, details, _ = status(lambda g=bad_grad: c.backward(0, 0, g))  # type: ignore[misc]
            assert code == Code.INVALID_ARGUMENT and details.startswith("grad_z: "), details
        assert snapshot(service, body) == before
        grad_h = c.backward(0, 0, activations(9))  # the pending step still works
        assert torch.equal(grad_h, TinyBody().backward(activations(), activations(9)))
        assert torch.equal(c.forward(0, 1, activations(4)), TinyBody().forward(activations(4)))


# ---- steps and sessions ----


def test_a_retried_step_is_computed_once(serve: Callable[..., tuple[BodyService, TinyBody]],
                                         certs: CertFolder) -> None:
    service, body = serve()
    h, grad_z = activations(), activations(7)
    with client(service, certs) as c:
        z = [c.forward(0, 0, h) for _ in range(3)]
        grad_h = [c.backward(0, 0, grad_z) for _ in range(3)]
        assert all(torch.equal(x, z[0]) for x in z) and all(torch.equal(g, grad_h[0]) for g in grad_h)
        assert (body.forward_calls, body.backward_calls) == (1, 1)
        code, _, _ = status(lambda: c.forward(0, 0, h))  # its Backward is done: a new step needs a new id
        assert code == Code.FAILED_PRECONDITION
        c.forward(0, 1, h)
        # a step id reused with a different h is refused, never silently answered with another's z
        code, details, _ = status(lambda: c.forward(0, 1, activations(8)))
        assert code == Code.FAILED_PRECONDITION and "different h" in details
        assert body.forward_calls == 2


def test_a_failing_body_leaves_no_step_behind(serve: Callable[..., tuple[BodyService, TinyBody]],
                                              certs: CertFolder) -> None:
    service, body = serve()
    with client(service, certs) as c:
        body.fail = True
        code, details, _ = status(lambda: c.forward(0, 0, activations()))
        assert code == Code.INTERNAL and "out of memory" in details
        assert service.held_steps("s1") == []
        body.fail = False
        assert torch.equal(c.forward(0, 0, activations()), TinyBody().forward(activations()))  # same ids


def test_a_retry_during_a_slow_step_waits_for_it(serve: Callable[..., tuple[BodyService, TinyBody]],
                                                 certs: CertFolder) -> None:
    service, body = serve(sleep=0.5)
    with client(service, certs, deadline_s=0.3, retries=2, backoff_s=0.0) as c:
        start = time.perf_counter()
        z = c.forward(0, 0, activations())  # attempt 1 times out at 0.3 s, attempt 2 gets the same step's z
        seconds = time.perf_counter() - start
    print(f"\n[retry] slow step answered to its retry after {seconds:.3f} s, computed once")
    assert torch.equal(z, TinyBody().forward(activations()))
    assert body.forward_calls == 1 and 0.45 < seconds < 0.6 + 0.3


def test_a_per_call_deadline_fires_on_time(serve: Callable[..., tuple[BodyService, TinyBody]],
                                           certs: CertFolder) -> None:
    service, _ = serve(sleep=1.0)
    with client(service, certs, deadline_s=0.3, retries=0) as c:
        assert status(lambda: c.backward(0, 9, activations()))[0] == Code.NOT_FOUND  # connect first
        code, _, seconds = status(lambda: c.forward(0, 0, activations()))
    print(f"\n[deadline] 0.300 s deadline fired after {seconds:.3f} s")
    assert code == Code.DEADLINE_EXCEEDED
    assert 0.3 <= seconds < 0.45


def test_limits_on_steps_and_sessions(serve: Callable[..., tuple[BodyService, TinyBody]],
                                      certs: CertFolder) -> None:
    service, body = serve(max_steps=2, max_sessions=2)
    c = client(service, certs)
    c.forward(0, 0, activations(0))
    c.forward(0, 1, activations(1))
    code, details, _ = status(lambda: c.forward(0, 2, activations(2)))  # both await their Backward
    assert code == Code.RESOURCE_EXHAUSTED and "await their Backward" in details
    c.backward(0, 0, activations(3))
    c.forward(0, 2, activations(2))  # makes room by dropping the answered step 0
    assert service.held_steps("s1") == [(0, 1), (0, 2)]
    code, _, _ = status(lambda: c.backward(0, 0, activations(3)))  # dropped: never computed again
    assert code == Code.FAILED_PRECONDITION and body.backward_calls == 1
    others = [client(service, certs, session=f"s{i}") for i in (2, 3)]
    others[0].forward(0, 0, activations())
    code, details, _ = status(lambda: others[1].forward(0, 0, activations()))
    assert code == Code.RESOURCE_EXHAUSTED and "sessions" in details
    thief = client(service, certs, session="s2", node="node-2")  # another certificate, same session id
    code, _, _ = status(lambda: thief.backward(0, 0, activations()))
    assert code == Code.PERMISSION_DENIED
    for x in (c, *others, thief):
        x.close()
    assert service.sessions() == []


def test_sessions_of_vanished_clients_are_freed(serve: Callable[..., tuple[BodyService, TinyBody]],
                                                certs: CertFolder) -> None:
    service, _ = serve(session_timeout=0.5, max_sessions=32)
    credentials = client_credentials(certs, "node-1")
    for i in range(20):  # 20 clients vanish mid-step: a Forward sent, no Backward, no End
        with grpc.secure_channel(service.address, credentials) as channel:  # closed as if the process died
            request = split_pb2.ForwardRequest(session_id=f"gone-{i}", round=0, step=0, h=encode_tensor(
                activations(i)))
            split_pb2_grpc.BodyStub(channel).Forward(request, timeout=5.0)
    last_call = time.perf_counter()
    assert len(service.sessions()) == 20 and service.held_bytes() == 20 * 2 * TENSOR  # h and z each
    while service.sessions() and time.perf_counter() - last_call < 3.0:
        time.sleep(0.01)
    print(f"\n[reaper] 20 abandoned sessions freed {time.perf_counter() - last_call:.2f} s after the last "
          "call (timeout 0.5 s, reaper period 0.125 s)")
    assert service.sessions() == [] and service.held_bytes() == 0


def test_the_client_resumes_after_a_server_restart(serve: Callable[..., tuple[BodyService, TinyBody]],
                                                   certs: CertFolder) -> None:
    first, first_body = serve()
    h, grad_z = activations(), activations(5)
    c = client(first, certs, retries=5)
    c.forward(0, 0, h)
    first.stop(grace=0)
    second, second_body = serve(port=first.port)  # same address, no state
    grad_h = c.backward(0, 0, grad_z)  # reconnects, finds no step, replays its Forward, then Backward
    assert torch.equal(grad_h, TinyBody().backward(h, grad_z))
    assert first_body.backward_calls + second_body.backward_calls == 1  # applied once
    assert second_body.forward_calls == 1
    c.close()
    assert second.sessions() == []


# ---- generated code ----


def test_regenerated_stubs_are_byte_identical(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the `dev` extra pins it)")
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pinned = next(r.split("==")[1] for r in dev if r.startswith("grpcio-tools=="))
    installed = importlib.metadata.version("grpcio-tools")
    if installed != pinned:
        pytest.skip(f"grpcio-tools {installed} is installed; the committed code is from {pinned}")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    generated = ["pollinate/edge/bundle_pb2.py", "pollinate/edge/bundle_pb2.pyi",
                 "pollinate/methods/sfprompt/split_pb2.py", "pollinate/methods/sfprompt/split_pb2.pyi",
                 "pollinate/methods/sfprompt/split_pb2_grpc.py"]
    for name in generated:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sh", "proto/generate.sh"], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in generated:
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes(), name
