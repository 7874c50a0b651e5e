"""SFPrompt: split learning with soft prompts, FedAvg of prompt and tail (https://arxiv.org/abs/2407.17533).

Before round 1 the setup starts the body service on the server trainee's frozen body, over mutual TLS:

- in a simulation, on 127.0.0.1 at a port the system chooses, with a throw-away CA made for the run
  (deleted by the teardown, key and all); its address and folder travel in every instruction
  (``sfprompt.body-address``, ``sfprompt.certs``), since every client runs on this machine;
- under ``pollinate serve`` (:meth:`SfPrompt.deployment`), on serve's host at ``sfprompt.body-port``
  with the deployment's certificate folder: ``server.crt`` presented, client certificates verified
  against ``ca.crt``. Only the address travels; each device presents its own certificate and dials the
  host it reaches the SuperLink by, on that port. Flower does not carry this traffic.

The rule is FedAvg of the prompt and the tail weighted by examples; nothing merges into the frozen part,
so the history stays empty. Per client and round: prompt and tail once each way over Flower, and 4·b·S·d
bytes per micro-batch for each of h, z, ∂L/∂z and ∂L/∂h over the body service (plus B·S bytes of
padding mask with BERT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from pollinate.aggregation import weighted_average
from pollinate.config import RunConfig, Scalar
from pollinate.deploy.certs import CertFolder
from pollinate.methods.settings import fail
from pollinate.methods.sfprompt.method import SfPromptMethod, SplitServer, check_model, max_tensor_bytes
from pollinate.methods.sfprompt.settings import DEFAULT_BODY_PORT, SfPromptSettings
from pollinate.protocol import ClientReport
from pollinate.strategies.base import Aggregate, Exchange, PollinateStrategy, refuse_client_ranks, weights_of

ADDRESS_KEY, CERTS_KEY = "sfprompt.body-address", "sfprompt.certs"


class SfPrompt(PollinateStrategy):
    """FedAvg of the prompt and the tail; the body service runs from setup to teardown."""

    averages_uploads = True

    method_name = "sfprompt"
    method: SfPromptMethod

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.service: Any = None
        self.certs: Any = None
        self._resources = contextlib.ExitStack()

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The model family, task and cut points; evaluation on the server; the service is the run's own."""
        refuse_client_ranks(cfg, "sfprompt trains a prompt and a tail, not LoRA ranks")
        if cfg.eval_split == "clients":
            raise fail("eval-split", cfg.eval_split, "with strategy 'sfprompt' a client holds no body to "
                       "evaluate the model with; use 'held-out' or 'validation'")
        if cfg.dp.on:
            raise fail("dp.mode", cfg.dp.mode, "strategy 'sfprompt' sends h and ∂L/∂z to the server's body "
                       "unclipped and without noise, so noising the averaged prompt and tail bounds nothing; "
                       "use dp.mode = 'off'")
        if cfg.resume:
            raise fail("resume", cfg.resume, "strategy 'sfprompt' cannot resume a run yet (its body service "
                       "starts in the setup before round 1)")
        check_service(cfg.sfprompt)
        check_model(cfg, SfPromptMethod(cfg).dims())

    @classmethod
    def deployment(cls, cfg: RunConfig, certs: Path, address: tuple[str, int]) -> dict[str, Scalar]:
        """Under ``pollinate serve``: the body service listens on the SuperLink's host at
        ``sfprompt.body-port`` with the deployment's folder (the one-line error if that port is taken)."""
        from pollinate.deploy.serve import check_free, join_address

        host, link_port = address
        port = cfg.sfprompt.body_port
        if port == link_port:
            raise fail("sfprompt.body-port", port, f"it is the SuperLink's port (--address); give another "
                       f"(default {DEFAULT_BODY_PORT})")
        check_free(host, port, "sfprompt.body-port")
        return {CERTS_KEY: str(certs.resolve()), ADDRESS_KEY: join_address(host, port)}

    def setup(self, server: SplitServer, exchange: Exchange, grid: Grid,  # type: ignore[override]
              config: ConfigRecord) -> None:
        """Start the body service on the server trainee's body."""
        self.start_body(server)

    def start_body(self, server: SplitServer) -> None:
        """The body service where :meth:`listen_on` says (kept until :meth:`teardown`)."""
        from pollinate.methods.sfprompt.channel import start_body_service
        from pollinate.methods.sfprompt.credentials import server_credentials

        if self.service is not None:
            return
        s, body = self.cfg.sfprompt, server.body
        self.certs, host, port = self.listen_on()
        self.service = start_body_service(
            body, hidden_size=body.hidden_size, credentials=server_credentials(self.certs), host=host,
            port=port, max_tensor_bytes=max_tensor_bytes(self.cfg, body.hidden_size),
            max_batch=self.cfg.batch_size, max_seq=s.prompt_tokens + self.cfg.max_seq_len,
            max_sessions=max(32, 2 * self.cfg.per_round))
        self._resources.callback(self.service.stop, 0)

    def listen_on(self) -> tuple[CertFolder, str, int]:
        """The certificate folder, host and port of the service: the deployment's, as ``pollinate serve``
        set them; or, in a simulation, a fresh CA (deleted by :meth:`teardown`) on 127.0.0.1, any port."""
        from pollinate.deploy.serve import parse_address
        from pollinate.methods.sfprompt.credentials import temporary_certs

        s = self.cfg.sfprompt
        if s.certs:
            host, port = parse_address(s.body_address, ADDRESS_KEY)
            return CertFolder.open(Path(s.certs)), host, port
        return self._resources.enter_context(temporary_certs(nodes=1)), "127.0.0.1", 0

    def teardown(self) -> None:
        """Stop the service, then delete a simulation's CA folder."""
        self._resources.close()
        self.service = self.certs = None

    def service_config(self) -> dict[str, str]:
        """The run-config keys that point the clients at the service (none before it starts): its address,
        and a simulation's throw-away folder. A deployment's folder is the server's: devices get ``""`` and
        present their own certificates."""
        if self.service is None:
            return {}
        sent = "" if self.cfg.sfprompt.certs else str(self.certs.path)
        return {ADDRESS_KEY: self.service.address, CERTS_KEY: sent}

    def node_message(self, node_id: int, arrays: ArrayRecord | None, config: ConfigRecord, since: int,
                     message_type: str = "train") -> Message:
        """Every instruction carries the body service's address and certificate folder."""
        return super().node_message(node_id, arrays, ConfigRecord({**config, **self.service_config()}),
                                    since, message_type)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.service is None:
            raise RuntimeError("sfprompt: the body service is not running (the setup starts it)")
        return super().configure_train(server_round, arrays, config, grid)

    def combine(self, reports: Sequence[ClientReport]) -> Aggregate:
        """Σ p_k (prompt_k, tail_k), p_k ∝ examples."""
        return Aggregate(state=weighted_average([r.upload for r in reports], weights_of(reports)))


def check_service(s: SfPromptSettings) -> None:
    """``sfprompt.body-address`` and ``sfprompt.certs`` are both empty (a simulation) or both set, as
    ``pollinate serve`` sets them: ``HOST:PORT`` and a certificate folder holding the server's key."""
    from pollinate.deploy.serve import parse_address

    if not s.body_address and not s.certs:
        return
    if not s.certs or not s.body_address:
        key, value, other = ((ADDRESS_KEY, s.body_address, CERTS_KEY) if s.body_address
                             else (CERTS_KEY, s.certs, ADDRESS_KEY))
        raise fail(key, value, f"`pollinate serve` sets it together with {other}; leave both empty (a "
                   "simulation's body service listens on 127.0.0.1; choose serve's port with "
                   "sfprompt.body-port)")
    parse_address(s.body_address, ADDRESS_KEY)
    folder = CertFolder(Path(s.certs))
    missing = [f.name for f in (folder.server_crt, folder.server_key, folder.ca_crt) if not f.is_file()]
    if missing:
        raise fail(CERTS_KEY, s.certs, f"it must be a folder of `pollinate certs init` ({missing[0]} is "
                   "missing)")
