"""Experiment trackers a job may log to (`report_to`): only those installed are offered, and a job
naming another is refused when it is queued, not when it starts training.

The web process checks with `importlib.util.find_spec`, which imports nothing. The worker runs in the
same environment on one machine; on several hosts each worker needs the tracker too.
"""

from __future__ import annotations

import importlib.util

from app.errors import UserError
from app.train_config import ReportTo

EXTRA = "trackers"
# report_to value -> the module transformers' integration imports for it
MODULES = {ReportTo.tensorboard: "tensorboard", ReportTo.wandb: "wandb", ReportTo.mlflow: "mlflow"}
# What to install: the `trackers` extra holds the common ones; MLflow is large, installed alone.
INSTALL = {
    ReportTo.tensorboard: f"pip install 'tuneboard[{EXTRA}]' (or pip install tensorboard)",
    ReportTo.wandb: f"pip install 'tuneboard[{EXTRA}]' (or pip install wandb)",
    ReportTo.mlflow: "pip install mlflow",
}


def installed(tracker: ReportTo) -> bool:
    module = MODULES.get(tracker)
    return module is None or importlib.util.find_spec(module) is not None


def offered() -> list[str]:
    """The `report_to` choices the New Job form shows: none, and each tracker installed."""
    return [t.value for t in ReportTo if installed(t)]


def check_installed(tracker: ReportTo) -> None:
    if not installed(tracker):
        raise UserError(
            f"The experiment tracker {tracker.value} is not installed, so a job cannot report "
            "to it.",
            f"Install it where Tuneboard and its workers run: {INSTALL[tracker]}, then restart "
            "Tuneboard; or choose report_to none.",
            code="tracker_not_installed",
            status_code=422,
        )
