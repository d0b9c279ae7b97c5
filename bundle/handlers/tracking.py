"""MLflow tracking that survives a resume: ``--resume true`` continues the interrupted run (the same MLflow run id,
metrics continuing at the checkpoint's epoch and iteration) instead of opening a new one.

- ``tracking_run_name`` keeps a training's run name in ``<ckpt_dir>/checkpoints/run_name.txt``; a resumed training
  reads it back, so MONAI's ``MLFlowHandler`` (which continues the latest unfinished run of that name) logs into the
  interrupted run. A run that finished (say, extended with a larger ``max_epochs``) gets a new run of the same name,
  tagged ``resumed_from`` with the finished run's id: the link between the two.
- ``ResumableMLFlowHandler`` logs only the parameters the run does not hold yet, and records a value changed
  against the resumed (or the finished, linked) run, such as another ``max_epochs``, as the tag
  ``changed_on_resume`` rather than failing: MLflow refuses to overwrite a parameter.
"""

from __future__ import annotations

import os
from typing import Any

from monai.handlers import MLFlowHandler

from bundle.files import write_text_atomic
from bundle.runtime import process_rank

__all__ = ["RUN_NAME_FILE", "ResumableMLFlowHandler", "tracking_run_name"]

RUN_NAME_FILE = "run_name.txt"


def tracking_run_name(ckpt_dir: str, resume: bool, fresh_name: str) -> str:
    """The training's MLflow run name: on resume the interrupted training's (module docstring), else
    ``fresh_name``, which rank 0 records next to the checkpoints for a later resume."""
    from bundle.runtime import as_bool

    path = os.path.join(ckpt_dir, "checkpoints", RUN_NAME_FILE)
    if as_bool(resume, "resume") and os.path.isfile(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    if process_rank() == 0:
        write_text_atomic(path, fresh_name + "\n")
    return fresh_name


class ResumableMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that can log into a run it resumes (module docstring)."""

    def start(self, engine: Any) -> None:
        finished_before = None
        if self.cur_run is None and self.run_name is not None:
            self._set_experiment()
            if self.experiment is not None:
                runs = [
                    r
                    for r in self.client.search_runs(self.experiment.experiment_id)
                    if r.info.run_name == self.run_name
                ]
                if runs and all(r.info.status == self.run_finish_status for r in runs):
                    finished_before = runs[0].info.run_id
        if finished_before is not None:  # the new run's parameters are compared with the finished run's
            self._previous_params = dict(self.client.get_run(finished_before).data.params)
        super().start(engine)
        if finished_before is not None and self.cur_run is not None:
            self.client.set_tag(self.cur_run.info.run_id, "resumed_from", finished_before)

    def _log_params(self, params: dict[str, Any]) -> None:
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        held = self.client.get_run(self.cur_run.info.run_id).data.params
        new = {key: value for key, value in params.items() if key not in held}
        before = {**getattr(self, "_previous_params", {}), **held}
        changed = {k: (before[k], str(v)) for k, v in params.items() if k in before and before[k] != str(v)}
        if new:
            super()._log_params(new)
        if changed:
            note = "; ".join(f"{key}: {old} -> {value}" for key, (old, value) in sorted(changed.items()))
            self.client.set_tag(self.cur_run.info.run_id, "changed_on_resume", note[:5000])
