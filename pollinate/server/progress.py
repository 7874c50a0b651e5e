"""The progress display: a bar of clients done per round, then one line per round."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as network traffic is counted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class RoundProgress:
    """Context manager around a run: ``start_round``, ``client_done``, ``end_round``."""

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.rounds = rounds
        self.console = console or Console(soft_wrap=True)  # long lines stay whole in logs
        self._bar = Progress(TextColumn("round {task.fields[round]}/{task.fields[rounds]}"),
                             BarColumn(), MofNCompleteColumn(), TextColumn("clients"),
                             TimeElapsedColumn(), console=self.console, transient=True)
        self._task: TaskID | None = None

    def __enter__(self) -> RoundProgress:
        self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bar.stop()

    def print(self, text: str) -> None:
        """A line above the bar."""
        self._bar.console.print(text, highlight=False)

    def start_round(self, server_round: int, clients: int) -> None:
        """A bar for the round's ``clients`` replies."""
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task("", total=clients, round=server_round, rounds=self.rounds)

    def client_done(self) -> None:
        """One more reply arrived."""
        if self._task is not None:
            self._bar.advance(self._task)

    def end_round(self, server_round: int, done: int, sampled: int, train_loss: float | None,
                  scores: dict[str, float], bytes_up: int, bytes_down: int, seconds: float,
                  epsilon: float | None = None) -> None:
        """The round's summary line (with ε spent so far under differential privacy)."""
        loss = f"{train_loss:.3f}" if train_loss is not None else "-"
        extra = "".join(f"  {k} {v:.3f}" for k, v in scores.items() if k != "loss")
        if epsilon is not None:
            extra += f"  ε {epsilon:.2f}"
        self.print(f"round {server_round}/{self.rounds}  clients {done}/{sampled}  train loss {loss}  "
                   f"eval loss {scores['loss']:.3f}{extra}  up {human_bytes(bytes_up)}  "
                   f"down {human_bytes(bytes_down)}  {seconds:.1f} s")
