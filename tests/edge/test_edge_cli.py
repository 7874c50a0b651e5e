"""The edge commands as `pollinate` runs them: register() on a parser, user errors as one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from pollinate.edge.cli import register
from pollinate.edge.runtime import EdgeModel


def run(argv: list[str]) -> int:
    """What pollinate.cli.main does with the subcommands register() adds."""
    parser = argparse.ArgumentParser(prog="pollinate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ValueError as err:
        print(f"pollinate: error: {err}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    prefix = tmp_path_factory.mktemp("cli-keys") / "edge"
    assert run(["keys", "generate", "--out", str(prefix)]) == 0
    private, public = prefix.with_name("edge.key"), prefix.with_name("edge.pub")
    assert private.stat().st_mode & 0o777 == 0o600 and public.is_file()
    return private, public


def test_export_classifier_int8_merged_signed_then_verify_info_classify(
        tmp_path: Path, cls_run: Path, key_pair: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    assert run(["export", str(cls_run), "--out", str(bundle), "--quantize", "int8", "--adapters", "merged",
                "--sign-key", str(key_pair[0])]) == 0
    assert "int8, adapters merged, signed" in capsys.readouterr().out
    assert run(["edge", "verify", str(bundle), "--public-key", str(key_pair[1])]) == 0
    assert capsys.readouterr().out.startswith(f"OK: bundle {bundle}: 2 files match their SHA-256")
    assert run(["edge", "info", str(bundle), "--public-key", str(key_pair[1])]) == 0
    info = capsys.readouterr().out
    assert "quantization: INT8" in info and "adapter_mode: MERGED" in info and "verified against key" in info
    assert run(["edge", "classify", str(bundle), "a fine film", "--public-key", str(key_pair[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in ("angry", "happy", "sad") and len(lines) == 4
    assert run(["edge", "classify", str(bundle), "a fine film", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == lines[0] and abs(sum(result["probabilities"].values()) - 1) < 1e-5


def test_generate_streams_the_answer(separate_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["edge", "generate", str(separate_bundle), "hello", "--max-new-tokens", "12"]) == 0
    expected = EdgeModel(separate_bundle).generate("hello", max_new_tokens=12)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_with_a_later_rounds_adapter_and_sampling(
        separate_bundle: Path, round2_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["edge", "generate", str(separate_bundle), "hello", "--max-new-tokens", "8", "--adapter",
            str(round2_adapter), "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    assert run(argv) == 0
    first = capsys.readouterr().out
    assert run(argv) == 0
    assert capsys.readouterr().out == first  # a seeded sampler repeats itself


def test_export_adapter_for_a_bundle(tmp_path: Path, gen_run: Path, separate_bundle: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "round-0002"
    assert run(["export", str(gen_run / "checkpoints" / "round-0002"), "--adapter-for", str(separate_bundle),
                "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"adapter: {out}.onnx_adapter")
    assert (tmp_path / "round-0002.onnx_adapter.manifest.pb").is_file()
    assert run(["edge", "info", str(tmp_path / "round-0002.onnx_adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest"]["adapter"]["rank"] == 6 and info["signature"] == "unsigned"


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "RUN", "--out", "B", "--quantize", "int3"],
     "pollinate: error: --quantize: 'int3' is not allowed; allowed: none, int8, int4"),
    (["export", "RUN", "--out", "B", "--adapters", "both"],
     "pollinate: error: --adapters: 'both' is not allowed; allowed: merged, separate"),
    (["edge", "generate", "SEPARATE", "hi", "--top-p", "0"],
     "pollinate: error: --top-p: 0.0 is not allowed; allowed: 0 < top-p <= 1"),
    (["edge", "generate", "SEPARATE", "hi", "--max-new-tokens", "1000"],
     "pollinate: error: --max-new-tokens: 1000 after a prompt of"),
    (["edge", "generate", "MERGED", "hi", "--adapter", "ADAPTER"],
     "pollinate: error: --adapter: bundle"),
    (["edge", "classify", "SEPARATE", "hi"], "pollinate: error: bundle"),
    (["edge", "verify", "SEPARATE", "--public-key", "KEY"],
     "pollinate: error: SEPARATE/manifest.pb: manifest is not signed, but a public key was given"),
    (["edge", "info", "NOWHERE"], "pollinate: error: NOWHERE: is not a bundle folder"),
], ids=["quantize", "adapters", "top-p", "too-long", "adapter-on-merged", "classify-a-generator", "unsigned",
        "no-bundle"])
def test_user_errors_are_one_line(argv: list[str], message: str, gen_run: Path, separate_bundle: Path,
                                  merged_bundle: Path, round2_adapter: Path, key_pair: tuple[Path, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    names = {"RUN": gen_run, "SEPARATE": separate_bundle, "MERGED": merged_bundle, "ADAPTER": round2_adapter,
             "KEY": key_pair[1]}
    argv = [str(names.get(a, a)) for a in argv]
    message = message.replace("SEPARATE", str(separate_bundle))
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
