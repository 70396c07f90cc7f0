"""The private submitit attributes the launcher relies on, each read through one accessor here.

submitit's public API cannot do two things the launcher needs: requeue a job from an
iteration boundary instead of from inside its own signal handler (which takes the warning
signal, the running submission's timeout budget and the job environment's requeue), and hand
the local executor its signal delay through ``AutoExecutor``. So the launcher reads five private
attributes; this module is the only place that does. It was written for, and is tested with,
the submitit releases in ``TESTED_RANGE``. When an attribute is missing (a submitit release
renamed or removed it), the accessor raises :class:`SubmititInternalsError`, one line naming
the installed version and the attribute, instead of an AttributeError in the middle of a
requeue; the launcher checks the job-side ones before it submits anything.
"""

from __future__ import annotations

import re
import signal
from typing import Any

import submitit

# The submitit releases this module was written for and tested with: >= 1.5, < 1.6.
TESTED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 5), (1, 6))


class SubmititInternalsError(RuntimeError):
    """The installed submitit lacks a private attribute the launcher needs."""


def installed_version_text() -> str:
    """The installed submitit's version string (``submitit.__version__``)."""
    return str(getattr(submitit, "__version__", "of unknown version"))


def installed_version() -> tuple[int, ...]:
    """The installed version as numbers ("1.5.4" -> (1, 5, 4)); () when it cannot be read."""
    match = re.match(r"\d+(?:\.\d+)*", installed_version_text())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def is_tested_version(version: tuple[int, ...] | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in ``TESTED_RANGE``."""
    low, high = TESTED_RANGE
    version = installed_version() if version is None else version
    return low <= version < high


def tested_range_text() -> str:
    """``TESTED_RANGE`` as a pip requirement specifier, e.g. ``>=1.5,<1.6``."""
    low, high = (".".join(str(part) for part in bound) for bound in TESTED_RANGE)
    return f">={low},<{high}"


def _private(owner: Any, name: str) -> Any:
    """``getattr(owner, name)``, or the one-line error that names the version and the attribute."""
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise SubmititInternalsError(
            f"submitit {installed_version_text()} has no {owner_name}.{name}, a private attribute that "
            f"l2w_dist.launch needs (written for submitit{tested_range_text()}): "
            f"pip install 'submitit{tested_range_text()}'"
        ) from None


def usr_signal() -> signal.Signals:
    """The signal submitit's jobs get before their time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL was set)."""
    return _private(submitit.JobEnvironment, "_usr_sig")()


def submission_timeout(submission: submitit.helpers.DelayedSubmission) -> tuple[int, int]:
    """A submission's time limit in minutes and how many more timeouts it may be requeued after."""
    return _private(submission, "_timeout_min"), _private(submission, "_timeout_countdown")


def requeue(env: submitit.JobEnvironment, countdown: int) -> None:
    """Requeue the running job: ``scontrol requeue`` on Slurm; locally, exit with the code on
    which submitit's local controller starts the job again."""
    _private(env, "_requeue")(countdown)


def set_local_signal_delay(executor: submitit.AutoExecutor, seconds: int) -> None:
    """Give the local executor its signal delay: it has the option, AutoExecutor does not pass it on."""
    _private(executor, "_executor").parameters["signal_delay_s"] = seconds


def check_job_internals() -> None:
    """Raise :class:`SubmititInternalsError` now if a job would lack an attribute it reads.

    Jobs read most of them only after a time-limit warning, hours into a run; checking at
    submission turns that late failure into an error before anything is queued.
    """
    usr_signal()
    submission_timeout(submitit.helpers.DelayedSubmission(print))
    _private(submitit.JobEnvironment, "_requeue")
