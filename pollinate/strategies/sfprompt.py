"""SFPrompt: split learning with soft prompts, FedAvg of prompt and tail (https://arxiv.org/abs/2407.17533).

Before round 1 the setup starts the body service on the server trainee's frozen body: 127.0.0.1, a port
the system chooses, mutual TLS from a throw-away CA made for the run (deleted by the teardown, key and
all). Its address and certificate folder travel in every instruction's configuration
(``sfprompt.body-address``, ``sfprompt.certs``). The rule is FedAvg of the prompt and the tail weighted by
examples; nothing merges into the frozen part, so the history stays empty. Per client and round:
prompt and tail once each way over Flower, and 4·b·S·d bytes per micro-batch for each of h, z, ∂L/∂z and
∂L/∂h over the body service (plus B·S bytes of padding mask with BERT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from pollinate.aggregation import weighted_average
from pollinate.config import RunConfig
from pollinate.methods.settings import fail
from pollinate.methods.sfprompt.method import SfPromptMethod, SplitServer, check_model, max_tensor_bytes
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
        for key, value in ((ADDRESS_KEY, cfg.sfprompt.body_address), (CERTS_KEY, cfg.sfprompt.certs)):
            if value:
                raise fail(key, value, "the server starts the body service and sets it for each run; "
                           "leave it empty")
        check_model(cfg, SfPromptMethod(cfg).dims())

    def setup(self, server: SplitServer, exchange: Exchange, grid: Grid,  # type: ignore[override]
              config: ConfigRecord) -> None:
        """Start the body service on the server trainee's body."""
        self.start_body(server)

    def start_body(self, server: SplitServer) -> None:
        """The body service with a fresh CA (kept until :meth:`teardown`)."""
        from pollinate.methods.sfprompt.channel import start_body_service
        from pollinate.methods.sfprompt.credentials import server_credentials, temporary_certs

        if self.service is not None:
            return
        s, body = self.cfg.sfprompt, server.body
        self.certs = self._resources.enter_context(temporary_certs(nodes=1))
        self.service = start_body_service(
            body, hidden_size=body.hidden_size, credentials=server_credentials(self.certs), host="127.0.0.1",
            port=0, max_tensor_bytes=max_tensor_bytes(self.cfg, body.hidden_size),
            max_batch=self.cfg.batch_size, max_seq=s.prompt_tokens + self.cfg.max_seq_len,
            max_sessions=max(32, 2 * self.cfg.per_round))
        self._resources.callback(self.service.stop, 0)

    def teardown(self) -> None:
        """Stop the service, then delete the CA folder."""
        self._resources.close()
        self.service = self.certs = None

    def service_config(self) -> dict[str, str]:
        """The run-config keys that point the clients at the service (none before it starts)."""
        if self.service is None:
            return {}
        return {ADDRESS_KEY: self.service.address, CERTS_KEY: str(self.certs.path)}

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
