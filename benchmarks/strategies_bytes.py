"""Bytes per client per round, up and down, of every strategy: measured in real runs against the formula.

Real ``pollinate simulate`` runs (3 clients, 2 rounds, 2 local steps: bytes do not depend on the steps,
but after a single step from B = 0 every client's A is still the shared A0, and all-zero differences would
be deduplicated by Flower's content addressing),
ranks 8,4,2 for flora and zeropad and 4 on every client for fedit, ffa and fedex. Measured: the
``bytes_up`` / ``bytes_down`` of every ``client`` event in metrics.jsonl (what Flower serialises for
each ArrayRecord, arrays and chunks). Expected: the strategy's ``payload_numbers`` x 4 bytes, plus the
classification head where the model has one (it travels both ways in every strategy; the formula counts
the LoRA factors only). ratio = measured / expected; the difference is the serialisation header.

Then the formula alone for SmolLM2-135M's shapes (30 layers x q 576x576, k 192x576, v 192x576,
o 576x576) at 10 clients: MB per client per round.

    python benchmarks/strategies_bytes.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import events_of, machine, read_events, run_simulate, save_result, table

NAME = "strategies_bytes"
BYTES = 4  # fp32 on the wire
HETERO, EQUAL = "8,4,2", "4,4,4"
RANKS = {"fedit": EQUAL, "ffa": EQUAL, "fedex": EQUAL, "flora": HETERO, "zeropad": HETERO}
COMMON: dict[str, Any] = {"num-clients": 3, "rounds": 2, "local-steps": 2, "batch-size": 4,
                          "max-seq-len": 32, "eval-examples": 8, "lr": 0.01, "seed": 0,
                          "lora.alpha": 16.0, "sim.workers": 2}
MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {"model": "tiny-llama", "task": "generation"},
    "minilm-l6": {"model": "minilm-l6", "task": "classification", "dataset": "rotten-tomatoes",
                  "partitioner": "iid"},
}
QUICK_MODELS = ("tiny-llama",)
SMOLLM2 = [(576, 576), (192, 576), (192, 576), (576, 576)] * 30  # q, k, v, o of 30 layers
SMOLLM2_RANKS = {"fedit": [8] * 10, "ffa": [8] * 10, "fedex": [8] * 10, "flora (uniform)": [8] * 10,
                 "flora (hetero)": [16, 16, 8, 8, 8, 4, 4, 4, 2, 2],
                 "zeropad (hetero)": [16, 16, 8, 8, 8, 4, 4, 4, 2, 2]}


def model_shapes(settings: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
    """(m, n) of every adapted matrix, and the numbers of the trained head (0 without one)."""
    warnings.filterwarnings("ignore")
    from pollinate.aggregation import LoraFactors
    from pollinate.config import RunConfig
    from pollinate.methods.lora.method import LoraTrainee
    from pollinate.methods.lora.variants import Shared

    cfg = RunConfig.from_run_config({**settings, "lora.rank": 8})
    trainee = LoraTrainee(cfg, 8, Shared())
    shapes = [tuple(w.shape) for w in trainee.adapter.base_weights(trainee.model).values()]
    head = LoraFactors.from_state(trainee.upload(), cfg.lora.alpha).extra
    return shapes, sum(t.numel() for t in head.values())  # type: ignore[misc]


def payload_numbers(strategy: str, shapes: list[tuple[int, int]], rank: int, ranks: list[int],
                    first_round: bool) -> tuple[int, int]:
    """(numbers up, numbers down) of one client, from the LoRA strategy's own formula."""
    from pollinate.strategies import LoraStrategy, strategy_class

    rule = strategy_class(strategy)
    if not issubclass(rule, LoraStrategy):
        raise SystemExit(f"strategy {strategy!r} is not a LoRA rule; this benchmark counts LoRA factors")
    return rule.payload_numbers(shapes, rank, ranks, first_round)


def measure(model: str, strategy: str) -> dict[str, Any]:
    """One run; its client events grouped by (round, rank)."""
    settings = {**MODELS[model], **COMMON, "strategy": strategy, "lora.ranks": RANKS[strategy]}
    with tempfile.TemporaryDirectory(prefix="pollinate-bytes-") as tmp:
        run = run_simulate(settings, Path(tmp))
        events = read_events(run["run_dir"])
    clients = [e for e in events if e["event"] == "client"]
    rounds = events_of(events, "train")
    return {"settings": settings, "wall_seconds": run["wall_seconds"],
            "clients": [{k: e[k] for k in ("round", "node_id", "rank", "bytes_up", "bytes_down")}
                        for e in clients],
            "train_bytes": {r: {"up": e["bytes_up"], "down": e["bytes_down"]} for r, e in rounds.items()}}


def compare(run: dict[str, Any], shapes: list[tuple[int, int]], head: int) -> list[dict[str, Any]]:
    """Measured vs expected per (round, rank); clients of one rank in one round must agree."""
    strategy = run["settings"]["strategy"]
    ranks = [int(x) for x in run["settings"]["lora.ranks"].split(",")]
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for e in run["clients"]:
        up, down = payload_numbers(strategy, shapes, e["rank"], ranks, first_round=e["round"] == 1)
        key = (e["round"], e["rank"])
        row = rows.setdefault(key, {"round": e["round"], "rank": e["rank"], "clients": 0,
                                    "up_expected": BYTES * (up + head),
                                    "down_expected": BYTES * (down + head), "up": set(), "down": set()})
        row["clients"] += 1
        row["up"].add(e["bytes_up"])
        row["down"].add(e["bytes_down"])
    out = []
    for key in sorted(rows, key=lambda k: (k[0], -k[1])):
        row = rows[key]
        row["up"], row["down"] = sorted(row["up"]), sorted(row["down"])
        out.append(row)
    return out


def formula_table(k: int = 10) -> list[dict[str, Any]]:
    """SmolLM2 shapes, ``k`` clients: MB per client per round from ``payload_numbers`` (no run)."""
    rows = []
    for label, ranks in SMOLLM2_RANKS.items():
        strategy = label.split()[0]
        per_rank = {}
        for r in sorted(set(ranks), reverse=True):
            up, down = payload_numbers(strategy, SMOLLM2, r, ranks, first_round=False)
            _, down1 = payload_numbers(strategy, SMOLLM2, r, ranks, first_round=True)
            per_rank[r] = {"up_mb": BYTES * up / 1e6, "down_mb": BYTES * down / 1e6,
                           "down_round1_mb": BYTES * down1 / 1e6}
        total = sum(per_rank[r]["up_mb"] + per_rank[r]["down_mb"] for r in ranks)
        rows.append({"label": label, "ranks": ranks, "per_rank": per_rank, "round_total_mb": total})
    return rows


def _bytes(values: list[int]) -> str:
    return "/".join(str(v) for v in values)


def _ratio(values: list[int], expected: int) -> str:
    return "-" if expected == 0 else "/".join(f"{v / expected:.3f}" for v in values)


def report(out: dict[str, Any]) -> str:
    """Measured against expected, per model, strategy, round and client rank."""
    rows = []
    for model, res in out["models"].items():
        for strategy, run in res["runs"].items():
            for row in run["comparison"]:
                rows.append([model, strategy, row["round"], row["rank"], row["clients"],
                             _bytes(row["up"]), row["up_expected"], _ratio(row["up"], row["up_expected"]),
                             _bytes(row["down"]), row["down_expected"],
                             _ratio(row["down"], row["down_expected"])])
    return table(["model", "strategy", "round", "rank", "clients", "up B", "up expected B", "up ratio",
                  "down B", "down expected B", "down ratio"], rows)


def _span(per_rank: dict[Any, dict[str, float]], key: str) -> str:
    """One value, or the range over the client ranks."""
    vals = sorted({round(v[key], 2) for v in per_rank.values()})
    return f"{vals[0]:.2f}" if len(vals) == 1 else f"{vals[0]:.2f}-{vals[-1]:.2f}"


def smollm2_report(out: dict[str, Any]) -> str:
    """The formula at SmolLM2 scale."""
    rows = []
    for row in out["smollm2"]:
        p = row["per_rank"]
        rows.append([row["label"], ",".join(map(str, row["ranks"])), _span(p, "up_mb"),
                     _span(p, "down_mb"), _span(p, "down_round1_mb"), f"{row['round_total_mb']:.0f}"])
    return table(["strategy", "client ranks", "up MB / client", "down MB / client (round >= 2)",
                  "down MB round 1 (formula)", "all 10 clients, up + down MB / round"], rows)


def findings(out: dict[str, Any]) -> list[str]:
    """Whether measured bytes match the formula, and the header overhead."""
    lines = []
    for model, res in out["models"].items():
        over, zero_b, under, extra = [], [], [], [0]
        for strategy, run in res["runs"].items():
            for row in run["comparison"]:
                for direction in ("up", "down"):
                    expected = row[f"{direction}_expected"]
                    for v in row[direction]:
                        if v >= expected:
                            over += [(v - expected) / expected] if expected else []
                            extra.append(v - expected)
                        elif direction == "down" and row["round"] == 1 and strategy != "flora":
                            zero_b.append(strategy)  # the initial adapter: all-zero B's, sent once
                        else:
                            under.append(f"{strategy} round {row['round']} {direction} "
                                         f"(rank {row['rank']}): {v} < {expected}")
        lines.append(f"{model}: {len(res['shapes'])} adapted matrices, head {res['head_numbers']} numbers; "
                     f"where measured >= expected the overhead is "
                     f"{100 * min(over):.1f}%-{100 * max(over):.1f}% of the payload (about "
                     f"{res['overhead_per_array']:.0f} B per array, {res['arrays_up']} arrays up for fedit).")
        if zero_b:
            lines.append(f"{model}: round 1 downlinks under the formula, as expected (the initial adapter's "
                         f"all-zero B's are deduplicated): {', '.join(sorted(set(zero_b)))}.")
        lines += [f"{model}: UNEXPECTEDLY below the formula: {u}" for u in under]
        if not under:
            lines.append(f"{model}: every other payload is at or above the formula, by at most "
                         f"{max(extra)} B (serialisation headers).")
    return lines


def section(out: dict[str, Any]) -> list[str]:
    """The bytes section of docs/benchmarks-strategies.md."""
    c = out["common"]
    return [
        "## Bytes on the wire (`benchmarks/strategies_bytes.py`)", "",
        f"Real `pollinate simulate` runs, {c['num-clients']} clients, {c['rounds']} rounds, "
        f"{c['local-steps']} local steps (2, not 1: after one step from B = 0 every A is still the shared "
        "A0, and FedEx's all-zero residual factors would be deduplicated on the wire): flora and zeropad "
        f"with ranks {HETERO}, fedit/ffa/fedex with rank 4 on every client. Measured: `bytes_up` / "
        "`bytes_down` of every `client` event (what Flower serialises per ArrayRecord; clients of "
        "one rank in one round "
        "are listed together, values separated by /). Expected: `payload_numbers` x 4 B, plus the "
        "classification head (MiniLM: 384x2 + 2 numbers), which every strategy sends both ways and the "
        "formula leaves out. Round 1 downlinks of fedit, ffa, fedex and zeropad carry the initial adapter "
        "whose B's are all zero: Flower's content addressing sends identical chunks once, so they come in "
        "under the formula; flora's round 1 downlink is only the head (nothing merged yet).", "",
        report(out), "",
        *[f"- {line}" for line in findings(out)], "",
        "The formula at SmolLM2-135M's scale (30 layers x q 576x576, k 192x576, v 192x576, o 576x576), "
        "10 clients, rank 8 or the heterogeneous ranks used in the quality benchmark, fp32, no run "
        "(round >= 2; round 1 downlinks of flora and fedex carry no merged delta):", "",
        smollm2_report(out), "",
        f"This benchmark took {out['wall_seconds'] / 60:.1f} min.", "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama only")
    args = parser.parse_args()
    start = time.perf_counter()
    models: dict[str, Any] = {}
    for model in (QUICK_MODELS if args.quick else MODELS):
        shapes, head = model_shapes({**MODELS[model], **COMMON})
        runs = {}
        for strategy in RANKS:
            run = measure(model, strategy)
            run["comparison"] = compare(run, shapes, head)
            runs[strategy] = run
            print(f"{model} {strategy}: {run['wall_seconds']:.0f} s", flush=True)
        fedit_up = runs["fedit"]["comparison"][-1]
        arrays_up = 2 * len(shapes) + (2 if head else 0)  # A and B per matrix, head weight and bias
        overhead = (fedit_up["up"][0] - fedit_up["up_expected"]) / arrays_up
        models[model] = {"shapes": shapes, "head_numbers": head, "runs": runs, "arrays_up": arrays_up,
                         "overhead_per_array": overhead}
    out = {"name": NAME, "quick": args.quick, "common": COMMON, "models": models,
           "smollm2": formula_table(), "machine": machine(), "wall_seconds": time.perf_counter() - start}
    print(report(out))
    print("\n".join(findings(out)))
    print(smollm2_report(out))
    print(f"results: {save_result(NAME, out)}")
    from strategies_quality import update_doc

    print(f"doc: {update_doc(args.quick)}")


if __name__ == "__main__":
    main()
