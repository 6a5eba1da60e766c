"""What runs on a Dask worker: one (case, stage) task, its time limit, and how a failure is classed.

A task never raises: a bad case comes back quarantined with a reason, a failure of the machine
(full disk, EIO, out of memory, a stuck read) comes back as a retryable failure that the driver
(``ctprep.runner``) retries in the run and again on the next one.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

from ctprep.cluster import pin_threads
from ctprep.quarantine import STAGE_ERROR, QuarantineError, one_line
from ctprep.stages.base import CaseResult, CaseTask, get_stage

# Errors of the machine, not of the case: a full disk, an I/O error, a permission or quota
# problem, a stale network mount, too little memory. Such a case is not quarantined: its row is
# flagged ENVIRONMENT_FAILURE, it is retried once more in the same run and again on every rerun.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT,
                              errno.ENOMEM, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE,
                              errno.ENFILE, errno.EBUSY, errno.EINTR})
ENVIRONMENT_FAILURE = "environment_failure"


def environment_cause(exc: BaseException) -> str | None:
    """A short cause ("ENOSPC", "MemoryError") if ``exc`` (or what it was raised from) is a
    failure of the environment rather than of the input, else None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, MemoryError):
            return "MemoryError"
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return errno.errorcode.get(exc.errno, "OSError")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def execute_case(task: CaseTask) -> CaseResult:
    """Run one per-case stage on one case (on a Dask worker, or in process).

    Never raises: QuarantineError -> quarantined with its kind; an error of the environment
    (:func:`environment_cause`: full disk, EIO, EACCES, out of memory, ... even when a reader
    wrapped it in a QuarantineError) -> a retryable failure (kind = the cause, info flag
    ``ENVIRONMENT_FAILURE``), never recorded as done or as a bad case; any other exception ->
    quarantined as ``stage_error`` with the exception's one-line message.
    """
    pin_threads()
    spec = get_stage(task.stage)
    t0 = time.perf_counter()
    base = dict(case_id=task.case.case_id, stage=task.stage, key=task.key)
    try:
        info = spec.run(task) or {}
        return CaseResult(**base, status="done", output=task.output_path, info=dict(info),
                          seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - bad input must never stop the run
        cause = environment_cause(e)
        if cause is not None:
            return CaseResult(**base, status="quarantined", kind=cause, info={ENVIRONMENT_FAILURE: True},
                              reason=one_line(f"{type(e).__name__}: {e}"), seconds=time.perf_counter() - t0)
        if isinstance(e, QuarantineError):
            return CaseResult(**base, status="quarantined", kind=e.kind, reason=e.reason,
                              seconds=time.perf_counter() - t0)
        return CaseResult(**base, status="quarantined", kind=STAGE_ERROR,
                          reason=one_line(f"{type(e).__name__}: {e}"), seconds=time.perf_counter() - t0)


# Longest a (case, stage) task may run before the run stops waiting for it (seconds; --task-timeout).
# A read stuck in the kernel (a hung network mount) cannot be interrupted from Python, so the task's
# thread is abandoned instead: the run finishes, the case is a retryable failure ("timeout").
TASK_TIMEOUT_S = 3600.0
TIMEOUT = "timeout"


def call_with_timeout(fn: Callable[[Any], Any], arg: Any, timeout_s: float | None) -> tuple[bool, Any]:
    """``(True, fn(arg))``, or ``(False, None)`` when ``fn`` has not returned after ``timeout_s``
    (its daemon thread is left behind; it cannot block the process from exiting)."""
    if not timeout_s:
        return True, fn(arg)
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(fn(arg)), daemon=True, name="ctprep-task")
    worker.start()
    worker.join(timeout_s)
    return (True, box[0]) if box else (False, None)


def execute_case_within(task: CaseTask, timeout_s: float | None = TASK_TIMEOUT_S) -> CaseResult:
    """:func:`execute_case`, given up after ``timeout_s`` as a retryable ``timeout`` failure."""
    done, result = call_with_timeout(execute_case, task, timeout_s)
    if done:
        return result
    return CaseResult(task.case.case_id, task.stage, task.key, "quarantined", kind=TIMEOUT,
                      reason=f"no result after {timeout_s:g} s (a stuck read?); left behind, retried on the next run",
                      info={ENVIRONMENT_FAILURE: True}, seconds=float(timeout_s or 0))


def is_retryable(row_or_result) -> bool:
    """True for a manifest row / result that failed for a reason outside the case (environment, cluster)."""
    info = row_or_result.info or {}
    return row_or_result.status == "quarantined" and bool(info.get(ENVIRONMENT_FAILURE) or info.get(CLUSTER_FAILURE))


# Manifest ``info`` flag of a row quarantined because its task failed on the cluster (worker died
# repeatedly, lost connection) rather than because the case is bad: such rows are stale on rerun.
CLUSTER_FAILURE = "cluster_failure"

