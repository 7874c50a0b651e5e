"""SFPrompt as a pollinate method (https://arxiv.org/abs/2407.17533): its trainees, update and planning.

A client holds the head (embeddings and the first ``head-layers`` blocks, frozen), the soft prompt and
the tail (the last ``tail-layers`` blocks and the output head), never the body: its blocks are dropped
right after the cut, so the client's memory is head and tail only. Per round (algorithms.md, "SFPrompt"):

1. local-loss phase: ``sfprompt.local-epochs`` passes of tail(head(x)) over its examples, AdamW on the
   prompt and the tail, nothing sent;
2. pruning: every example's EL2N score (no grad), keep the hardest ⌊γn⌋;
3. split phase: ``local-steps`` steps of ``batch-size`` kept examples, each micro-batch's h sent to the
   server's body service over mutual TLS (:mod:`pollinate.methods.sfprompt.channel`), z back, ∂L/∂z sent,
   ∂L/∂h back into the prompt.

The server's trainee is the whole model with the prompt prepended (:class:`PromptedModel`): it evaluates
exactly as the split computes, and its frozen body is what the strategy serves. Clients and server train
with dropout off (eval mode), so the split is exact (the body is always in eval mode).

Nothing merges into the frozen part: the update (:class:`NoUpdate`) is empty and the history stays empty,
so every node stays at version 0; the prompt and the tail travel as the round's state and are averaged.
The body service's address reaches the clients in the run configuration (``sfprompt.body-address``),
which the strategy fills in for the run. A simulated client presents the certificate of the server's
throw-away folder (``sfprompt.certs``, sent too); a device presents its own
(:meth:`SplitClient.use_device_tls`, from ``pollinate agent``) and dials the host it reaches the server
by, on the port the server sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pollinate import workload
from pollinate.aggregation import fingerprint
from pollinate.config import RunConfig
from pollinate.data import IGNORE_INDEX, collate
from pollinate.methods.base import SYNC_TOLERANCE, Example, Exportable, Schema, TrainSpec, schema_of
from pollinate.methods.plan import Estimate, ModelDims, Plan, micro_batches, seq_len_steps
from pollinate.methods.settings import fail
from pollinate.methods.sfprompt import memory
from pollinate.methods.sfprompt.settings import SfPromptSettings, check_cut
from pollinate.methods.sfprompt.split import FAMILIES, Body, BodyCompute, Split, keep_hardest, split_step
from pollinate.training import TrainResult, batches, micro_batches_of

if TYPE_CHECKING:
    import grpc

    from pollinate.deploy.certs import DeviceTls

STATE_FILE = "sfprompt.safetensors"
"""The prompt and the tail in a checkpoint (the keys of an upload)."""
DEADLINE_S = 120.0
"""Seconds one call to the body service may take (a body forward and backward of one micro-batch)."""
NODE = "node-1"
"""The client certificate of a simulation's throw-away CA (every simulated client presents it)."""
FAMILY_TASKS = {"llama": "generation", "bert": "classification"}
"""The task each family SFPrompt cuts is trained for (a Llama causal LM, a BERT sequence classifier)."""


@dataclass(frozen=True)
class NoUpdate:
    """SFPrompt's update: nothing. The body is frozen and the prompt and tail travel as the state."""

    span: int = 1

    @classmethod
    def combine(cls, updates: Sequence[Self]) -> Self:
        return cls(sum(u.span for u in updates))

    def to_flat(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Tensor], *, span: int = 1) -> Self:
        if flat:
            raise ValueError(f"sfprompt update: it carries no tensors, got {sorted(flat)[:3]}")
        return cls(span)


def check_model(cfg: RunConfig, dims: ModelDims) -> None:
    """The one-line error for a model or task SFPrompt cannot cut, or cut points that leave no body."""
    family = FAMILY_TASKS.get(dims.model_type)
    if family is None:
        raise fail("model", cfg.model, f"sfprompt cuts {', '.join(FAMILIES)} models; this one is "
                   f"{dims.model_type!r}")
    if cfg.task != family:
        raise fail("task", cfg.task, f"sfprompt trains {dims.model_type} models for {family} only")
    s = cfg.sfprompt
    check_cut(s.head_layers, s.tail_layers, dims.layers)
    if dims.encoder and s.prompt_tokens + cfg.max_seq_len > dims.max_positions:
        raise fail("sfprompt.prompt-tokens", s.prompt_tokens,
                   f"with max-seq-len {cfg.max_seq_len} it must be at most "
                   f"{dims.max_positions - cfg.max_seq_len} (the model has {dims.max_positions} positions)")


def max_tensor_bytes(cfg: RunConfig, hidden: int) -> int:
    """The largest h, z or gradient of the run: 4·b·S·d with b the batch and S = P + max-seq-len."""
    return 4 * cfg.batch_size * (cfg.sfprompt.prompt_tokens + cfg.max_seq_len) * hidden


def _cut(cfg: RunConfig) -> tuple[nn.Module, Any, Split]:
    """The base model, its tokenizer and the split of it (:func:`cut`)."""
    model, tokenizer = workload.base_model(cfg)
    return model, tokenizer, cut(model, cfg.sfprompt, cfg.seed)


def cut(base: nn.Module, settings: SfPromptSettings, seed: int) -> Split:
    """The split of ``base`` at the run's points, the prompt drawn from the run seed (every node's starts
    equal, and round 1 sends the server's anyway)."""
    return Split(base, head_layers=settings.head_layers, tail_layers=settings.tail_layers,
                 prompt_tokens=settings.prompt_tokens, seed=seed)


def _head_params(split: Split) -> dict[str, Tensor]:
    """The frozen head (embeddings and head blocks) by position: what the client and the server share
    and never change, so its fingerprint checks that both cut the same base."""
    modules = [*split.parts.entry_modules(), *split.head_blocks]
    return {f"{i}.{name}": p for i, m in enumerate(modules) for name, p in m.named_parameters()}


def _block_list(split: Split) -> nn.ModuleList:
    """The model's ModuleList of blocks (Llama's ``model.layers``, BERT's ``bert.encoder.layer``)."""
    inner: Any = getattr(split.parts, "inner")  # noqa: B009 - both families keep the backbone there
    blocks: nn.ModuleList = inner.layers if hasattr(inner, "layers") else inner.encoder.layer
    return blocks


def drop_body(split: Split, head_layers: int, tail_layers: int) -> int:
    """Replace the body's blocks by empty modules, so their weights are freed; the parameters dropped.

    The rest is copied into memory of its own: a checkpoint loaded by memory-mapping keeps the whole file
    mapped while any of its tensors lives, and the body's pages with it.
    """
    blocks = _block_list(split)
    dropped = 0
    for i in range(head_layers, len(blocks) - tail_layers):
        dropped += sum(p.numel() for p in blocks[i].parameters())
        blocks[i] = nn.Module()
        split.parts.blocks[i] = blocks[i]
    model: nn.Module = getattr(split.parts, "model")  # noqa: B009 - both families keep the model there
    with torch.no_grad():  # weights read from a memory-mapped file share one mapping with the body's:
        for tensor in [*model.parameters(), *model.buffers()]:  # own copies let it go (tied ones once)
            tensor.data = tensor.data.clone()
    return dropped


class _RemoteBody:
    """The :class:`~pollinate.methods.sfprompt.split.Body` of :func:`split_step` over a ``BodyClient``:
    each forward opens a step, its backward closes it."""

    def __init__(self, client: Any, round_: int) -> None:
        self.client, self.round, self.step = client, round_, 0

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        self.step += 1
        z: Tensor = self.client.forward(self.round, self.step, h, mask)
        return z

    def backward(self, h: Tensor, grad_z: Tensor, mask: Tensor | None) -> Tensor:
        grad_h: Tensor = self.client.backward(self.round, self.step, grad_z)
        return grad_h


def _failure(address: str, error: Any) -> str:
    """One line for a failed call to the body service (``error``: a ``grpc.RpcError``); a connection that
    never got through names the usual causes."""
    code = error.code().name
    hint = ("; is its port open to this device, and is the device's certificate signed by the "
            "deployment's CA?" if code == "UNAVAILABLE" else "")
    return f"the body service at {address} answered {code}: {' '.join(str(error.details()).split())}{hint}"


class SplitClient:
    """A client's trainee: head, prompt and tail; the body runs on the server."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.settings = cfg, cfg.sfprompt
        model, self.tokenizer, self.split = _cut(cfg)
        self.dropped = drop_body(self.split, self.settings.head_layers, self.settings.tail_layers)
        model.eval()  # dropout off: the split equals the unsplit model (the body is in eval mode too)
        self.model: nn.Module = model
        self.version = 0
        self.rounds = 0
        """Trainings so far: the round number of the body service's step ids in this session."""
        self.device: DeviceTls | None = None
        """A device's own certificate and server host (:meth:`use_device_tls`); None: a simulated client."""

    def use_device_tls(self, tls: DeviceTls) -> None:
        """Dial the body service as this device: its own certificate, the host it reaches the server by."""
        self.device = tls

    def load(self, state: Mapping[str, Tensor], *, seed: int) -> None:
        """The global prompt and tail."""
        self.split.load_state(state)

    def upload(self) -> dict[str, Tensor]:
        """The prompt (``sfprompt.prompt``) and the tail (``sfprompt.tail.<name>``), fp32 copies."""
        return self.split.state()

    def merge(self, update: NoUpdate) -> None:
        """Nothing to fold in; the version counts the (empty) updates."""
        self.version += update.span

    def fingerprint(self) -> float:
        """Of the frozen head, which the server's trainee holds too."""
        return fingerprint(_head_params(self.split))

    def save(self, folder: Path) -> None:
        save_file(self.upload(), str(folder / STATE_FILE))

    def body(self, endpoint: tuple[str, grpc.ChannelCredentials] | None = None) -> Any:
        """A new session with the body service at ``endpoint`` (default: :meth:`endpoint`)."""
        from pollinate.methods.sfprompt.channel import BodyClient  # grpc only where a client trains

        address, credentials = endpoint or self.endpoint()
        hidden = int(getattr(self.model, "config").hidden_size)  # noqa: B009 - a transformers config
        return BodyClient(address, credentials, deadline_s=DEADLINE_S,
                          session_id=f"sfprompt-{uuid.uuid4().hex}",
                          max_tensor_bytes=max_tensor_bytes(self.cfg, hidden))

    def endpoint(self) -> tuple[str, grpc.ChannelCredentials]:
        """Where the body service is and what this client presents to it.

        A device dials the host it reaches the server by, at the port of ``sfprompt.body-address`` (the
        server may listen on 0.0.0.0), with its own certificate. A simulated client dials the address as
        sent, with the ``node-1`` certificate of the server's throw-away folder (``sfprompt.certs``).
        """
        from pollinate.methods.sfprompt.credentials import client_credentials, port_of

        s = self.settings
        if not s.body_address:
            raise fail("sfprompt.body-address", s.body_address, "a split client needs the body service's "
                       "address; the sfprompt strategy sends it with every instruction")
        if self.device is not None:
            device = self.device
            return device.address(port_of(s.body_address)), client_credentials(device.folder, device.node)
        if not s.certs:
            raise fail("sfprompt.certs", s.certs, "a device needs its own certificate: start it with "
                       "`pollinate agent --certs DIR --key DIR/nodes/<name>/auth.key` (node config certs, "
                       "node-name and server-host)")
        return s.body_address, client_credentials(Path(s.certs), NODE)

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """Local-loss epochs, EL2N pruning, then ``spec.steps`` split steps on the kept examples."""
        import grpc  # only where a client trains

        start = time.perf_counter()
        endpoint = self.endpoint()  # a device without its certificate stops here, before any work
        optimizer = self.optimizer(spec)
        self.model.eval()
        local = self.local_phase(examples, spec, optimizer, seed)
        kept = self.prune(examples, min(spec.micro_batch, spec.batch_size))
        self.rounds += 1
        body = self.body(endpoint)
        try:
            remote = _RemoteBody(body, self.rounds)
            loss, seen, tokens = self.split_phase([examples[i] for i in kept], spec, optimizer, remote, seed)
            traffic = body.traffic(self.rounds)
        except grpc.RpcError as error:  # one line for the server's log, not gRPC's multi-line repr
            raise RuntimeError(_failure(endpoint[0], error)) from None
        finally:
            body.close()
        figures = {"split-bytes-up": float(traffic.sent), "split-bytes-down": float(traffic.received),
                   "split-steps": float(remote.step), "kept-examples": float(len(kept)),
                   "local-loss": local}
        return TrainResult(loss, seen, tokens, time.perf_counter() - start, figures)

    def optimizer(self, spec: TrainSpec) -> torch.optim.Optimizer:
        """AdamW on the prompt and the tail, fresh each round (both phases share it)."""
        return torch.optim.AdamW(self.split.trainable(), lr=spec.lr, weight_decay=0.0)

    def split_phase(self, kept: Sequence[Example], spec: TrainSpec, optimizer: torch.optim.Optimizer,
                    body: Body, seed: int) -> tuple[float, int, int]:
        """``spec.steps`` steps of ``batch-size`` kept examples through ``body`` (the service, or a
        :class:`BodyCompute` in process); the mean loss, examples and tokens seen."""
        pad, micro = self.tokenizer.pad_token_id, min(spec.micro_batch, spec.batch_size)
        stream = batches(kept, spec.batch_size, seed + 1)
        total, seen, tokens = 0.0, 0, 0
        for _ in range(spec.steps):
            step = next(stream)
            for part, share in micro_batches_of(step, micro, pad):
                loss, _ = split_step(self.split, body, part, weight=share)
                total += float(loss) * share
                tokens += int(part["attention_mask"].sum())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(step)
        return total / max(spec.steps, 1), seen, tokens

    def local_phase(self, examples: Sequence[Example], spec: TrainSpec, optimizer: torch.optim.Optimizer,
                    seed: int) -> float:
        """``local-epochs`` passes of tail(head(x)) in shuffled batches of ``batch-size``; the mean loss.
        Nothing leaves the client."""
        pad, micro = self.tokenizer.pad_token_id, min(spec.micro_batch, spec.batch_size)
        per_epoch = max(len(examples) // spec.batch_size, 1)
        stream = batches(examples, spec.batch_size, seed)
        total, count = 0.0, 0
        for _ in range(self.settings.local_epochs * per_epoch):
            for part, share in micro_batches_of(next(stream), micro, pad):
                loss, _ = self.split.local_loss(part)
                (loss * share).backward()
                total += float(loss.detach()) * share
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            count += 1
        return total / max(count, 1)

    def prune(self, examples: Sequence[Example], micro: int) -> list[int]:
        """Indices of the hardest ⌊γn⌋ examples by EL2N of the local-loss outputs."""
        pad = self.tokenizer.pad_token_id
        scores = [self.split.local_scores(collate(list(examples[i : i + micro]), pad))
                  for i in range(0, len(examples), micro)]
        return [int(i) for i in keep_hardest(torch.cat(scores), self.settings.keep)]


@dataclass
class PromptedOutput:
    """What :class:`PromptedModel` returns, as a transformers output: the loss (None without labels)
    and the logits ([B, C], or [B, S, V] with the prompt's positions first)."""

    loss: Tensor | None
    logits: Tensor


class PromptedModel(nn.Module):
    """The whole model with the soft prompt prepended, computed exactly as the split computes it:
    head(x; p), the body's blocks (with the body's mask), the tail and its loss."""

    def __init__(self, base: nn.Module, split: Split, body: BodyCompute) -> None:
        super().__init__()
        self.base, self.prompt = base, split.prompt  # registered: parameters() and state_dict() see both
        self._split, self._body = split, body

    @property
    def split(self) -> Split:
        """The cut (prompt, head, tail); :meth:`Split.load_state` sets what trains."""
        return self._split

    @property
    def body(self) -> BodyCompute:
        """The body's blocks, as the server's service runs them."""
        return self._body

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                **_: Any) -> PromptedOutput:
        split = self._split
        given = labels is not None
        if labels is None:  # no loss asked for: labels that count nothing
            labels = torch.full_like(input_ids, IGNORE_INDEX) if split.task == "generation" \
                else torch.zeros(input_ids.shape[0], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        h = split.head(batch)
        z = split.parts.run(self._body.blocks, h, split.body_mask(batch))
        loss, logits = split.tail(z, batch)
        return PromptedOutput(loss if given else None, logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None, **_: Any) -> Tensor:
        """Greedy decoding, one full forward per new token (no cache): the prompt and the input ids
        followed by the new ids."""
        ids = input_ids
        for _step in range(max_new_tokens):
            logits = self(ids, torch.ones_like(ids)).logits  # [1, S, V]
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and int(nxt[0, 0]) == eos_token_id:
                break
        return ids


def prompted_model(base: nn.Module, settings: SfPromptSettings, seed: int) -> PromptedModel:
    """``base`` cut at the run's points, with the run's initial prompt, as one prompted model (eval mode).

    The server's trainee is built this way; so is the edge export's model of a checkpoint (its prompt and
    tail loaded with ``model.split.load_state``), so the bundle computes what the server evaluated.
    """
    split = cut(base, settings, seed)
    body = BodyCompute(base, head_layers=settings.head_layers, tail_layers=settings.tail_layers)
    return PromptedModel(base, split, body).eval()


class SplitServer:
    """The server's trainee: the whole model with the prompt; its frozen body is what the service runs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        base, self.tokenizer = workload.base_model(cfg)
        prompted = prompted_model(base, cfg.sfprompt, cfg.seed)
        self.split, self.body = prompted.split, prompted.body
        self.model: nn.Module = prompted
        self.version = 0

    def load(self, state: Mapping[str, Tensor], *, seed: int) -> None:
        self.split.load_state(state)

    def upload(self) -> dict[str, Tensor]:
        return self.split.state()

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """The server serves the body; clients train."""
        raise RuntimeError("sfprompt: the server's trainee does not train (its clients do, over the split)")

    def merge(self, update: NoUpdate) -> None:
        self.version += update.span

    def fingerprint(self) -> float:
        """Of the frozen head, as a client's (see :meth:`body_fingerprint` for the body)."""
        return fingerprint(_head_params(self.split))

    def body_fingerprint(self) -> float:
        """Of the body's blocks, which nothing may ever change."""
        return fingerprint({f"{i}.{name}": p for i, block in enumerate(self.body.blocks)
                            for name, p in block.named_parameters()})

    def save(self, folder: Path) -> None:
        """The prompt and the tail (:data:`STATE_FILE`)."""
        save_file(self.upload(), str(folder / STATE_FILE))


class SfPromptMethod:
    """SFPrompt's method: split learning with soft prompts, the body frozen on the server."""

    name: ClassVar[str] = "sfprompt"
    settings_table: ClassVar[str] = "sfprompt"
    title: ClassVar[str] = "SFPrompt"
    update_type: ClassVar[type[NoUpdate]] = NoUpdate

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.sync_tolerance = SYNC_TOLERANCE

    def calibration_size(self) -> int:
        return 0

    def dims(self) -> ModelDims:
        """The model's shapes (LoRA's targets are read but unused)."""
        return workload.dims(self.cfg, "lora")

    def candidates(self, dims: ModelDims, client: int) -> list[Plan]:
        """Longer sequences, then larger micro-batches; the prompt's positions count against a learned
        position table."""
        most = dims.max_positions - self.cfg.sfprompt.prompt_tokens if dims.encoder else None
        return [Plan(self.name, b, self.cfg.batch_size // b, t, False)
                for t in seq_len_steps(self.cfg.max_seq_len, most)
                for b in micro_batches(self.cfg.batch_size)]

    def estimate(self, dims: ModelDims, plan: Plan) -> Estimate:
        s = self.cfg.sfprompt
        return memory.estimate(dims, plan, self.cfg.task, head_layers=s.head_layers,
                               tail_layers=s.tail_layers, prompt_tokens=s.prompt_tokens)

    def spec(self, plan: Plan) -> TrainSpec:
        """``local-steps`` split steps of ``batch-size`` at ``sfprompt.lr``."""
        return TrainSpec(steps=self.cfg.local_steps, batch_size=self.cfg.batch_size, lr=self.cfg.sfprompt.lr,
                         micro_batch=plan.micro_batch)

    def client(self, plan: Plan) -> SplitClient:
        return SplitClient(self.cfg)

    def server(self) -> SplitServer:
        return SplitServer(self.cfg)

    def initial_state(self, server: SplitServer) -> dict[str, Tensor]:
        """The server's prompt and tail."""
        return server.upload()

    def sample_update(self, trainee: Any, seed: int) -> NoUpdate:
        """The only update there is: none."""
        return NoUpdate()

    def update_size(self, server: SplitServer, upload: Mapping[str, Tensor]) -> float:
        """‖upload − global state‖ over the prompt and the tail."""
        start = server.upload()
        total = sum(float((v.to(torch.float64) - start[k].to(torch.float64)).pow(2).sum())
                    for k, v in upload.items())
        return float(total**0.5)

    def scale_update(self, server: SplitServer, upload: Mapping[str, Tensor],
                     factor: float) -> dict[str, Tensor]:
        """global + factor·(upload − global)."""
        start = server.upload()
        return {k: start[k] + factor * (v - start[k]) for k, v in upload.items()}

    def dp_view(self, upload: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The upload itself: prompt and tail, fixed fp32 shapes."""
        return dict(upload)

    def upload_schema(self, server: SplitServer, plan: Mapping[str, int]) -> Schema:
        """Exactly the prompt's and the tail's keys and shapes, fp32, for every plan."""
        return schema_of(server.upload())

    def export_view(self) -> Exportable:
        """The prompt and the tail (:data:`STATE_FILE`), no peft view: the edge export bakes the prompt into
        a merged graph (:mod:`pollinate.edge.prompted`); ``pollinate merge`` refuses the checkpoint."""
        return Exportable(adapter=False, prompt_state=STATE_FILE,
                          merge_unsupported="a plain Hugging Face model folder has no place for the soft "
                                            "prompt prepended to every input; `pollinate export` builds an "
                                            "edge bundle whose graph prepends it")
