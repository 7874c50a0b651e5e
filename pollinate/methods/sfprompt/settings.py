"""The ``[sfprompt]`` settings table of SFPrompt (https://arxiv.org/abs/2407.17533). Standard library.

The cut points are checked twice: their signs here, and whether they leave a body in
:func:`check_cut`, which needs the model's layer count (known only once the model is).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.methods.settings import fail, key, positive

DEFAULT_BODY_PORT = 9095
"""The body service's port under ``pollinate serve``: next to Flower's 9091-9093 without taking one."""


@dataclass(frozen=True)
class SfPromptSettings:
    """Head and tail on the client, the frozen body on the server; the prompt and the tail train."""

    head_layers: int = field(default=1, metadata=key("head-layers"))
    """Blocks after the embeddings that run on the client before h is sent (at least 1)."""
    tail_layers: int = field(default=1, metadata=key("tail-layers"))
    """Last blocks that run on the client and train, with the final norm or pooler and the output head."""
    prompt_tokens: int = field(default=8, metadata=key("prompt-tokens"))
    """Soft prompt vectors prepended to every input; each adds a position to h, z and their gradients."""
    keep: float = field(default=0.5, metadata=key("keep"))
    """γ: the share of each client's examples, hardest first by EL2N, that the split phase trains on."""
    local_epochs: int = field(default=1, metadata=key("local-epochs"))
    """Epochs of the local-loss phase (tail(head(x)), no communication) before pruning."""
    lr: float = field(default=1e-3, metadata=key("lr"))
    """AdamW learning rate of the prompt and the tail (a fine-tuning rate: the tail is full blocks)."""
    body_port: int = field(default=DEFAULT_BODY_PORT, metadata=key("body-port"))
    """The port the body service listens on under ``pollinate serve`` (devices must reach it: open it in
    the firewall). A simulation's service takes any free port on 127.0.0.1 instead."""
    body_address: str = field(default="", metadata=key("body-address"))
    """``host:port`` the body service listens on. Set by ``pollinate serve`` (its ``--address`` host and
    ``body-port``) together with ``certs``; empty: a simulation, the service on 127.0.0.1 at a port the
    system chooses. The server sends the address it listens on with every instruction."""
    certs: str = field(default="", metadata=key("certs"))
    """The certificate folder of the body service's mutual TLS. Set by ``pollinate serve`` to the server's
    folder (``server.crt``, ``server.key``, ``ca.crt``), never sent to devices: each presents its own
    certificate. Empty: a simulation, whose server makes a throw-away CA for the run and sends its folder
    with every instruction (every simulated client runs on the server's machine)."""

    def __post_init__(self) -> None:
        check_layers("sfprompt.head-layers", self.head_layers)
        check_layers("sfprompt.tail-layers", self.tail_layers)
        check_prompt_tokens(self.prompt_tokens)
        check_keep(self.keep)
        positive("sfprompt.local-epochs", self.local_epochs)
        positive("sfprompt.lr", self.lr)
        check_port(self.body_port)


def check_layers(name: str, layers: int) -> None:
    """Raise the one-line error of key ``name`` unless ``layers`` >= 1."""
    if layers < 1:
        raise fail(name, layers, "it must be at least 1 (each client side runs one block or more)")


def check_port(port: int) -> None:
    """Raise the one-line error unless ``port`` is a TCP port a service can listen on."""
    if not 0 < port < 65536:
        raise fail("sfprompt.body-port", port,
                   f"give a TCP port from 1 to 65535 (default {DEFAULT_BODY_PORT})")


def check_prompt_tokens(tokens: int) -> None:
    """Raise the one-line error unless the prompt has at least one vector."""
    if tokens < 1:
        raise fail("sfprompt.prompt-tokens", tokens, "it must be at least 1")


def check_keep(keep: float) -> None:
    """Raise the one-line error unless 0 < ``keep`` <= 1."""
    if not 0 < keep <= 1:  # also refuses NaN
        raise fail("sfprompt.keep", keep, "it must be in (0, 1]")


def check_cut(head_layers: int, tail_layers: int, num_layers: int) -> None:
    """Raise the one-line error unless head and tail are each >= 1 block and leave >= 1 for the body.

    Parameters
    ----------
    head_layers, tail_layers : int
        The cut points (``sfprompt.head-layers``, ``sfprompt.tail-layers``).
    num_layers : int
        The model's blocks (``config.num_hidden_layers``).
    """
    check_layers("sfprompt.head-layers", head_layers)
    check_layers("sfprompt.tail-layers", tail_layers)
    if head_layers + tail_layers >= num_layers:
        raise fail("sfprompt.head-layers", head_layers,
                   f"with sfprompt.tail-layers = {tail_layers}, head-layers + tail-layers must be below the "
                   f"model's {num_layers} layers (the body needs at least one)")
