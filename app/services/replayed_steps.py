"""Steps a resumed attempt trained again, counted once.

A job's attempt that resumes from its checkpoint at step 40 trains steps 41, 42, ... again and
logs them again, beside the rows the attempt before it logged for those steps. A retry from
scratch starts again at step 1. What the adapter carries is the latest attempt's training and,
of each earlier attempt, only the steps before the ones a later attempt trained again: the rows
`latest_rows` picks. Figures about the run (tokens trained, the loss curve, the final losses)
read those; what honestly means work done (all the tokens the GPU went through) reads them all.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, false, or_
from sqlmodel import Session, col, func, select

from app.models import Metric


def latest_rows(s: Session, job_id: int) -> ColumnElement[bool]:
    """A condition on `Metric` that keeps the job's rows of the training its adapter carries:
    where several attempts logged a step, the latest attempt's row."""
    firsts = s.exec(
        select(Metric.attempt, func.min(Metric.step))
        .where(Metric.job_id == job_id)
        .group_by(col(Metric.attempt))
    ).all()
    kept: list[ColumnElement[bool]] = []
    below: int | None = None  # the first step that a later attempt logged again
    for attempt, first in sorted(firsts, reverse=True):
        if below is None:
            kept.append(col(Metric.attempt) == attempt)
        else:
            kept.append(and_(col(Metric.attempt) == attempt, col(Metric.step) < below))
        below = first if below is None else min(below, first)
    return and_(col(Metric.job_id) == job_id, or_(false(), *kept))
