"""Run an edge bundle with onnxruntime, numpy and tokenizers alone: no torch, no transformers.

:class:`EdgeModel` verifies the bundle (every file's SHA-256, and the Ed25519 signature when a trusted
public key is given), opens the graph in an onnxruntime session, and

- generates with the KV cache: one prefill over the prompt, then one step per new token, greedy or
  sampled (temperature, top-p), streaming each token to a callback;
- classifies a text into the bundle's labels;
- activates LoRA adapter files on a separate-adapter graph (``onnxruntime.LoraAdapter``), refusing a
  file whose hash or signature does not verify or that was made for another base model.

Chat prompts are rendered with the bundle's chat template by jinja2 (a sandboxed environment, as
transformers renders them), then tokenised without adding special tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tokenizers import Tokenizer

from pollinate.edge import manifest as mf
from pollinate.edge.bundle_pb2 import Adapter, AdapterMode, BundleManifest, Task

__all__ = ["EdgeModel", "TextStream", "check_adapter", "sample_next"]

TokenCallback = Callable[[int], None]


# --------------------------------------------------------------------------------------------------
# Sampling and streaming
# --------------------------------------------------------------------------------------------------


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token from one row of logits (V,): argmax when ``temperature`` is 0.

    Otherwise a draw from softmax(logits / temperature), restricted to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling).
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        keep = order[before < top_p]  # always keeps the most likely token
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[0], p=probs))


class TextStream:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = 0  # characters already passed on

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def check_adapter(adapter: Adapter, bundle: BundleManifest, what: str) -> None:
    """Raise VerificationError unless ``adapter`` was made for the base of ``bundle``."""
    if adapter.base_weights_sha256 != bundle.base.weights_sha256:
        raise mf.VerificationError(
            f"{what}: made for base weights {adapter.base_weights_sha256[:16]}, but this bundle's "
            f"base ({bundle.base.name}) is {bundle.base.weights_sha256[:16]}: it belongs to another base")


def _check_parameters(path: Path, bundle: BundleManifest) -> None:
    """Raise VerificationError unless the adapter file only holds inputs of the graph, fitting shapes."""
    shapes = {i.name: tuple(i.shape) for i in bundle.graph.lora_inputs}
    for name, value in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items():
        shape = tuple(value.shape())
        expected = shapes.get(name)
        if expected is None or len(expected) != len(shape) or any(
                e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
            raise mf.VerificationError(f"adapter {path}: parameter {name} {shape} is not an adapter "
                                       "input of this bundle's graph")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # LoRA inputs are overridable initializers by design: no warning
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _as_key(public_key: Ed25519PublicKey | str | Path | None) -> Ed25519PublicKey | None:
    if public_key is None or isinstance(public_key, Ed25519PublicKey):
        return public_key
    return mf.load_public_key(Path(public_key))


class EdgeModel:
    """A verified edge bundle in an onnxruntime session.

    Parameters
    ----------
    bundle : str or Path
        The bundle folder.
    public_key : Ed25519PublicKey, str or Path, optional
        The trusted key (or its PEM file). When given, the bundle's manifest and every adapter's
        manifest must be signed by it.
    adapter : str or Path, optional
        An adapter file to activate instead of the bundle's own (separate-adapter bundles only).
    threads : int, optional
        onnxruntime intra-op threads (default: onnxruntime's choice, all cores).

    Raises
    ------
    VerificationError
        If a file, the manifest or the signature does not verify, or the adapter belongs to
        another base.
    """

    def __init__(self, bundle: str | Path, *, public_key: Ed25519PublicKey | str | Path | None = None,
                 adapter: str | Path | None = None, threads: int | None = None) -> None:
        self.folder = Path(bundle)
        self.public_key = _as_key(public_key)
        self.manifest, self.verified = mf.read_bundle_manifest(self.folder, self.public_key)
        self.session = _session(self.folder / self.manifest.graph.file, threads)
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer.file))
        self.tokenizer.no_padding()
        if not self.is_generator:  # a classifier reads at most max_length tokens; a prompt is never cut
            self.tokenizer.enable_truncation(int(self.manifest.tokenizer.max_length))
        self.eos_ids = frozenset(int(t) for t in self.manifest.tokenizer.eos_token_ids)
        self.adapter: Adapter | None = None
        self._run_options: ort.RunOptions | None = None
        self._lora: ort.LoraAdapter | None = None
        self._template: Any = None
        if adapter is not None:
            self.load_adapter(adapter)
        else:
            self.use_bundle_adapter()

    # ---- properties ----------------------------------------------------------------------------

    @property
    def is_generator(self) -> bool:
        return self.manifest.task == Task.GENERATION

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def num_layers(self) -> int:
        return int(self.manifest.graph.num_layers)

    # ---- adapters ------------------------------------------------------------------------------

    def load_adapter(self, path: str | Path) -> Adapter:
        """Verify an adapter file (hash, signature, base, parameters) and make it the active adapter.

        Replaces the active adapter; the graph stays loaded. Returns the adapter's manifest entry.
        """
        path = Path(path)
        if self.manifest.adapter_mode != AdapterMode.SEPARATE:
            raise ValueError(f"--adapter: bundle {self.folder} has its adapter merged into the graph; "
                             "adapter files need a bundle exported with --adapters separate")
        adapter_manifest, _ = mf.read_adapter_manifest(path, self.public_key)
        check_adapter(adapter_manifest.adapter, self.manifest, f"adapter {path}")
        _check_parameters(path, self.manifest)
        self._activate(path, adapter_manifest.adapter)
        return adapter_manifest.adapter

    def _activate(self, path: Path, adapter: Adapter) -> None:
        lora = ort.LoraAdapter()
        lora.Load(str(path))  # memory-maps the file
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        self._lora, self._run_options, self.adapter = lora, options, adapter

    def use_bundle_adapter(self) -> None:
        """Activate the bundle's own adapter file (verified with the bundle), if it has one."""
        if self.manifest.adapter_mode == AdapterMode.SEPARATE and self.manifest.adapter.file:
            self._activate(self.folder / self.manifest.adapter.file, self.manifest.adapter)

    def clear_adapter(self) -> None:
        """Run the bare graph: for a separate-adapter bundle, the base model."""
        self._lora = self._run_options = self.adapter = None

    # ---- raw forward passes --------------------------------------------------------------------

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """The past of a prefill: one (B, kv_heads, 0, head_dim) key and value per layer."""
        g = self.manifest.graph
        empty = np.zeros((batch, g.num_kv_heads, 0, g.head_dim), dtype=np.float32)
        return [empty] * (2 * g.num_layers)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass of a generation graph.

        Parameters
        ----------
        input_ids : ndarray of int64, (B, S)
        attention_mask : ndarray of int64, (B, P + S)
            1 for real tokens, 0 for (left) padding, over the past and the new tokens.
        past : list of ndarray, optional
            ``key_0, value_0, key_1, ...`` each (B, kv_heads, P, head_dim); None for a prefill.

        Returns
        -------
        logits : ndarray (B, S, V)
        present : list of ndarray, each (B, kv_heads, P + S, head_dim)
        """
        if past is None:
            past = self.empty_cache(input_ids.shape[0])
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64),
                                        "attention_mask": attention_mask.astype(np.int64)}
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self.session.run(None, feeds, run_options=self._run_options)
        return outputs[0], list(outputs[1:])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits of a whole batch without a cache: (B, S, V) for generation, (B, C) for classification."""
        if self.is_generator:
            return self.forward(input_ids, attention_mask)[0]
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        result: np.ndarray = self.session.run(None, feeds, run_options=self._run_options)[0]
        return result

    # ---- generation ----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of ``prompt``: as a user turn of the chat template ending where the answer starts."""
        if not chat or not self.manifest.tokenizer.chat_template_file:
            return list(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        text = self._render([{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            source = (self.folder / self.manifest.tokenizer.chat_template_file).read_text(encoding="utf-8")
            self._template = env.from_string(source)
        t = self.manifest.tokenizer
        bos = self.tokenizer.id_to_token(int(t.bos_token_id)) if t.bos_token_id >= 0 else ""
        eos = self.tokenizer.id_to_token(int(t.eos_token_ids[0])) if t.eos_token_ids else ""
        text: str = self._template.render(messages=messages, add_generation_prompt=True,
                                          bos_token=bos, eos_token=eos)
        return text

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, on_token: TokenCallback | None = None) -> list[int]:
        """Generate up to ``max_new_tokens`` after ``prompt_ids`` with the KV cache; stops at eos.

        Defaults come from the bundle (greedy unless its defaults say otherwise). ``on_token`` is
        called with each new token id as soon as it is chosen (the eos token included).
        """
        self._check_generator()
        d = self.manifest.generation
        max_new = int(max_new_tokens if max_new_tokens is not None else d.max_new_tokens)
        temp = float(temperature if temperature is not None else d.temperature)
        p = float(top_p if top_p is not None else (d.top_p or 1.0))
        _check_sampling(max_new, temp, p)
        self._check_length(len(prompt_ids), max_new)
        rng = np.random.default_rng(seed)
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)  # (1, S)
        mask = np.ones_like(ids)
        past: list[np.ndarray] | None = None
        new: list[int] = []
        for _ in range(max_new):
            logits, past = self.forward(ids, mask, past)
            token = sample_next(logits[0, -1], temp, p, rng)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in self.eos_ids:
                break
            ids = np.asarray([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        return new

    def generate(self, prompt: str, *, chat: bool = True, on_text: Callable[[str], None] | None = None,
                 **options: Any) -> str:
        """The answer to ``prompt`` as text; ``on_text`` receives it piece by piece as it is generated.

        ``options`` are those of :meth:`generate_ids` (``max_new_tokens``, ``temperature``, ``top_p``,
        ``seed``).
        """
        stream = TextStream(self.tokenizer, on_text or (lambda _: None))
        ids = self.generate_ids(self.encode_prompt(prompt, chat), on_token=stream, **options)
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _check_generator(self) -> None:
        if not self.is_generator:
            raise ValueError(f"bundle {self.folder} holds a classifier; use `pollinate edge classify`")

    def _check_length(self, prompt_len: int, max_new: int) -> None:
        limit = int(self.manifest.graph.max_positions or 0)
        if prompt_len == 0:
            raise ValueError("prompt: encodes to no tokens; give a non-empty prompt")
        if limit and prompt_len + max_new > limit:
            raise ValueError(f"--max-new-tokens: {max_new} after a prompt of {prompt_len} tokens exceeds "
                             f"the model's {limit} positions; allowed: at most {limit - prompt_len}")

    # ---- classification ------------------------------------------------------------------------

    def classify(self, text: str) -> tuple[str, dict[str, float]]:
        """The most likely label of ``text`` and the probability of every label."""
        if self.is_generator:
            raise ValueError(f"bundle {self.folder} holds a text generator; use `pollinate edge generate`")
        ids = np.asarray([self.tokenizer.encode(text).ids], dtype=np.int64)  # (1, S), specials added
        logits = self.logits(ids, np.ones_like(ids))[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        names = self.labels or [str(i) for i in range(probs.shape[0])]
        return names[int(np.argmax(probs))], {n: float(q) for n, q in zip(names, probs, strict=True)}


def _check_sampling(max_new: int, temperature: float, top_p: float) -> None:
    if max_new < 1:
        raise ValueError(f"--max-new-tokens: {max_new} is not allowed; allowed: an integer >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"--temperature: {temperature} is not allowed; allowed: >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p: {top_p} is not allowed; allowed: 0 < top-p <= 1")
