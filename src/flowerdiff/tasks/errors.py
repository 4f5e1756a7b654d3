"""User-facing errors: print the one-paragraph message, not a stack trace.

Every error below already says what is wrong and how to fix it; a traceback on top only hides
that. ``HYDRA_FULL_ERROR=1`` brings the traceback back for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from flowerdiff.callbacks.nan_guard import NonFiniteLossError
from flowerdiff.data.sources import DataSourceError
from flowerdiff.infra.checkpoints import CheckpointError
from flowerdiff.infra.config import ConfigError
from flowerdiff.infra.rundir import RunDirectoryBusy
from flowerdiff.metrics.weights import FIDWeightsError

USER_ERRORS = (
    ConfigError,
    DataSourceError,
    CheckpointError,
    FIDWeightsError,
    NonFiniteLossError,
    RunDirectoryBusy,
)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a :data:`USER_ERRORS` exception into its message on stderr and exit status 1."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
