"""Command line of the edge part: ``export``, ``merge``, ``keys generate`` and
``edge generate|classify|info|verify``.

:func:`register` adds them to the ``pollinate`` command. User errors are ``ValueError`` (the caller
prints them as one line). Heavy modules are imported inside the handlers: the runner commands never
import torch; ``python -m pollinate.edge`` runs them on a device that has onnxruntime alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_edge_commands", "main", "register"]

_BAR = "-" * 40


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from pollinate.edge.adapters import ADAPTER_MODES
    from pollinate.edge.quantize import QUANTIZATIONS, check_choice

    if args.adapter_for is not None:
        from pollinate.edge.adapters import export_adapter

        if args.quantize != "none" or args.adapters != "merged":
            raise ValueError("--adapter-for: writes an adapter file only; drop --quantize and --adapters "
                             "(the bundle's graph is already quantised as it is)")
        path = export_adapter(args.source, args.adapter_for, args.out, sign_key=args.sign_key)
        print(f"adapter: {path} (+ {path.name}.manifest.pb) for bundle {args.adapter_for}")
        return 0
    check_choice("--quantize", args.quantize, QUANTIZATIONS)
    check_choice("--adapters", args.adapters, ADAPTER_MODES)
    from pollinate.edge.export import export_bundle

    manifest = export_bundle(args.source, args.out, quantization=args.quantize,
                             adapter_mode=args.adapters, sign_key=args.sign_key)
    size = sum(f.size for f in manifest.files)
    signed = "signed" if args.sign_key else "unsigned"
    print(f"bundle: {args.out} ({len(manifest.files)} files, {size / 1e6:.1f} MB, "
          f"{args.quantize}, adapters {args.adapters}, {signed})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pollinate.edge.merge import merge_checkpoint

    info = merge_checkpoint(args.source, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"model: {args.out} ({size / 1e6:.1f} MB; {info['auto_class']}.from_pretrained loads it): round "
          f"{info['round']} of {info['strategy'] or info['method']} run {info['run']}")
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from pollinate.edge.manifest import generate_keys

    private, public = generate_keys(args.out)
    print(f"private key: {private} (keep it secret: it signs bundles)")
    print(f"public key:  {public} (give it to devices: `--public-key {public}`)")
    return 0


def _open(args: argparse.Namespace) -> Any:
    from pollinate.edge.runtime import EdgeModel

    return EdgeModel(args.bundle, public_key=args.public_key, adapter=args.adapter, threads=args.threads)


def _generate(args: argparse.Namespace) -> int:
    model = _open(args)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    model.generate(args.prompt, chat=not args.no_chat, on_text=show, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    sys.stdout.write("\n")
    return 0


def _classify(args: argparse.Namespace) -> int:
    label, probs = _open(args).classify(args.text)
    if args.json:
        print(json.dumps({"label": label, "probabilities": probs}))
        return 0
    print(label)
    width = max(len(n) for n in probs)
    for name, prob in probs.items():
        print(f"  {name:<{width}}  {prob:.4f}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pollinate.edge import manifest as mf

    path = Path(args.bundle)
    if path.is_file():  # an adapter file
        message, verified = mf.read_adapter_manifest(path, _key(args))
    else:
        message, verified = mf.read_bundle_manifest(path, _key(args), check_files=not args.no_check)
    if args.json:
        print(json.dumps({"manifest": mf.to_dict(message), "signature": _signature(verified)}, indent=2))
        return 0
    for line in _describe(mf.to_dict(message)):
        print(line)
    print(f"signature: {_signature(verified)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pollinate.edge import manifest as mf
    from pollinate.edge.runtime import check_adapter

    key = mf.load_public_key(args.public_key)
    bundle, _ = mf.read_bundle_manifest(args.bundle, key)
    print(f"OK: bundle {args.bundle}: {len(bundle.files)} files match their SHA-256; "
          f"manifest signed by key {mf.key_id(key)}")
    for adapter_path in args.adapter:
        adapter, _ = mf.read_adapter_manifest(adapter_path, key)
        check_adapter(adapter.adapter, bundle, f"adapter {adapter_path}")
        print(f"OK: adapter {adapter_path}: matches its SHA-256, signed by key {mf.key_id(key)}, "
              f"made for this bundle's base")
    return 0


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------


def _key(args: argparse.Namespace) -> Any:
    from pollinate.edge.manifest import load_public_key

    return load_public_key(args.public_key) if args.public_key else None


def _signature(verified: Any) -> str:
    if not verified.signed:
        return "unsigned"
    if verified.signature_checked:
        return f"ed25519, verified against key {verified.key_id}"
    return f"ed25519 by key {verified.key_id} (not checked: pass --public-key)"


def _describe(manifest: dict[str, Any]) -> list[str]:
    """Short human-readable lines for a bundle or adapter manifest dict."""
    lines: list[str] = []
    for key, value in manifest.items():
        if key == "files":
            lines.append("files:")
            lines += [f"  {f['name']}  {int(f['size']) / 1e6:.2f} MB  sha256 {f['sha256'][:16]}"
                      for f in value]
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {_short(v)}" for k, v in value.items() if v not in ("", [], {})]
        elif value not in ("", [], {}):
            lines.append(f"{key}: {_short(value)}")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return f"{len(value)} entries"
        return ", ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------


def _runner_options(parser: argparse.ArgumentParser, adapter: bool = True) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle folder")
    parser.add_argument("--public-key", type=Path, metavar="KEY",
                        help="trusted Ed25519 public key: refuse a bundle or adapter not signed by it")
    if adapter:
        parser.add_argument("--adapter", type=Path, metavar="FILE",
                            help="an adapter file to use instead of the bundle's own")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")


def add_edge_commands(edge: Any) -> None:
    """Add ``generate``, ``classify``, ``info`` and ``verify`` to a subparsers object."""
    gen = edge.add_parser("generate", help="stream the answer to a prompt",
                          description="Generate an answer with the bundle's graph and KV cache, "
                                      "printing it token by token.")
    _runner_options(gen)
    gen.add_argument("prompt", metavar="PROMPT", help="the user's message")
    gen.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="most new tokens (default: the bundle's)")
    gen.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="0 is greedy (the default); above 0 samples")
    gen.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="nucleus sampling mass (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    gen.add_argument("--no-chat", action="store_true",
                     help="feed the prompt as is, without the chat template")
    gen.set_defaults(func=_generate)

    cls = edge.add_parser("classify", help="print the label of a text and every label's probability")
    _runner_options(cls)
    cls.add_argument("text", metavar="TEXT", help="the text to classify")
    cls.add_argument("--json", action="store_true", help="print one JSON object")
    cls.set_defaults(func=_classify)

    info = edge.add_parser("info", help="show a bundle's (or an adapter file's) manifest")
    info.add_argument("bundle", type=Path, metavar="BUNDLE_OR_ADAPTER")
    info.add_argument("--public-key", type=Path, metavar="KEY", help="also check the signature")
    info.add_argument("--no-check", action="store_true", help="skip hashing the bundle's files")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(func=_info)

    ver = edge.add_parser("verify", help="check a bundle's files and signature (and adapter files)")
    ver.add_argument("bundle", type=Path, metavar="BUNDLE")
    ver.add_argument("--public-key", type=Path, metavar="KEY", required=True, help="the trusted public key")
    ver.add_argument("--adapter", type=Path, action="append", default=[], metavar="FILE",
                     help="also verify this adapter file (repeatable)")
    ver.set_defaults(func=_verify)


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``export``, ``merge``, ``keys`` and ``edge`` to the ``pollinate`` command's subparsers."""
    exp = commands.add_parser(
        "export", help="turn a checkpoint into an edge bundle (ONNX, tokenizer, signed manifest)",
        description="Export a run's latest checkpoint (or a given checkpoint folder) to an edge bundle "
                    "that onnxruntime runs alone; or, with --adapter-for, only its adapter as a file for "
                    "an existing bundle exported with --adapters separate.")
    exp.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    exp.add_argument("--out", type=Path, required=True, metavar="BUNDLE",
                     help="the bundle folder to create (or the adapter file, with --adapter-for)")
    exp.add_argument("--quantize", default="none", metavar="none|int8|int4", help="weight quantisation")
    exp.add_argument("--adapters", default="merged", metavar="merged|separate",
                     help="merge the adapter into the graph, or keep it as a swappable file")
    exp.add_argument("--sign-key", type=Path, metavar="KEY", help="Ed25519 private key to sign with")
    exp.add_argument("--adapter-for", type=Path, metavar="BUNDLE",
                     help="write only the adapter, for this separate-adapter bundle")
    exp.set_defaults(func=_export)

    merge = commands.add_parser(
        "merge", help="turn a checkpoint into a plain Hugging Face model folder",
        description="Merge a run's latest checkpoint (or a given checkpoint folder) into its base model: "
                    "the updates merged into the base during the run, the adapter and a trained head, "
                    "saved as a Hugging Face model folder that AutoModelForCausalLM (or "
                    "AutoModelForSequenceClassification) loads without peft or pollinate.")
    merge.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    merge.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="the model folder to create (it must not exist, or be empty)")
    merge.set_defaults(func=_merge)

    keys = commands.add_parser("keys", help="signing keys for edge bundles")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    gen = keys_commands.add_parser("generate", help="make an Ed25519 key pair: PREFIX.key and PREFIX.pub")
    gen.add_argument("--out", type=Path, required=True, metavar="PREFIX", help="e.g. keys/edge")
    gen.set_defaults(func=_keys_generate)

    edge = commands.add_parser("edge", help="run an edge bundle with onnxruntime (no torch)")
    add_edge_commands(edge.add_subparsers(dest="edge_command", required=True, metavar="COMMAND"))


def main(argv: list[str] | None = None) -> int:
    """``python -m pollinate.edge``: the runner commands alone, for a device without torch."""
    import os

    parser = argparse.ArgumentParser(prog="python -m pollinate.edge",
                                     description="Run a pollinate edge bundle with onnxruntime.")
    add_edge_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ValueError as err:
        if os.environ.get("POLLINATE_DEBUG"):
            raise
        print(f"pollinate: error: {err}", file=sys.stderr)
        return 2
