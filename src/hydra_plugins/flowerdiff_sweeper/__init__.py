"""flowerdiff's Optuna sweeper: the official one, made safe to resume (``hparams_search``).

Hydra only loads sweepers from the ``hydra_plugins`` namespace, hence this package. Resuming a
study (same ``hydra.sweep.dir``, so the same ``optuna.db``) with the official sweeper would
restart job numbering at 0, overwriting the earlier trials' job directories, and restart the
seeded sampler, repeating the earlier trials' parameters. This subclass numbers the new jobs
after the trials already stored (job dir N is trial N) and offsets the sampler seed by that count.
"""

from __future__ import annotations

from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `sweep` extra is not installed; Hydra would warn on every start
    OptunaSweeper = None

if OptunaSweeper is not None:

    class ResumableOptunaSweeper(OptunaSweeper):
        """OptunaSweeper that continues a stored study instead of replaying it."""

        def setup(
            self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
        ) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            impl = self.sweeper
            done = stored_trials(impl.storage, impl.study_name)
            if not done:
                return
            impl.job_idx = done
            sampler_cfg = config.hydra.sweeper.sampler
            if sampler_cfg.get("seed") is not None and not sampler_cfg.get("_partial_", False):
                impl.sampler = instantiate(sampler_cfg, seed=sampler_cfg.seed + done)


def stored_trials(storage: Any, study_name: str | None) -> int:
    """How many trials the study already holds in ``storage`` (0 when it does not exist yet)."""
    if storage is None or study_name is None:
        return 0
    import optuna

    summaries = optuna.get_all_study_summaries(storage)
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)
