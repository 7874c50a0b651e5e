"""What data pollinate knows by name: tasks, built-in datasets and partitioners.

Standard library only and outside `pollinate.data`, so that reading a configuration (and
``pollinate --help``) does not load torch, datasets or flwr-datasets.
"""

from __future__ import annotations

GENERATION = "generation"
CLASSIFICATION = "classification"
TASKS = (GENERATION, CLASSIFICATION)

BUILTIN_DATASETS: dict[str, str] = {
    "chatterbot": GENERATION,
    "rotten-tomatoes": CLASSIFICATION,
    "imdb": CLASSIFICATION,
    "bbc-news": CLASSIFICATION,
}
"""Built-in dataset name -> its task."""

PARTITIONERS = ("iid", "dirichlet", "natural")

_DEFAULTS = {GENERATION: "chatterbot", CLASSIFICATION: "rotten-tomatoes"}


def check_task(task: str) -> None:
    """Raise a one-line ValueError unless ``task`` is one of `TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not a task; allowed: {', '.join(TASKS)}")


def default_dataset(task: str) -> str:
    """Return the built-in dataset used for ``task`` when none is configured.

    Parameters
    ----------
    task : str
        ``"generation"`` or ``"classification"``.

    Returns
    -------
    str
        ``"chatterbot"`` for generation, ``"rotten-tomatoes"`` for classification.
    """
    check_task(task)
    return _DEFAULTS[task]
