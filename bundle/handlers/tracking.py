"""MLflow tracking that survives a resume: ``--resume true`` continues the interrupted run (the same MLflow run id,
metrics continuing at the checkpoint's epoch and iteration) instead of opening a new one.

- ``tracking_run_name`` keeps a training's run name in ``<ckpt_dir>/checkpoints/run_name.txt``; a resumed training
  reads it back, so MONAI's ``MLFlowHandler`` (which continues the latest unfinished run of that name) logs into the
  interrupted run. A run that finished (say, extended with a larger ``max_epochs``) gets a new run of the same name,
  tagged ``resumed_from`` with the finished run's id: the link between the two.
- ``ResumableMLFlowHandler`` logs only the parameters the run does not hold yet, and records a value changed
  against the resumed (or the finished, linked) run, such as another ``max_epochs``, as the tag
  ``changed_on_resume`` rather than failing: MLflow refuses to overwrite a parameter.
- A new SQLite store costs MLflow's schema migrations, about 3 s of a fresh process. Where the environment
  variable ``BUNDLE_MLFLOW_TEMPLATES`` names a folder holding ``mlflow-<version>.db`` (an empty store that this
  MLflow version migrated, e.g. made once by ``make_sqlite_template``), a store that does not exist yet starts as a
  copy of it; its ``Default`` experiment gets the artifact location MLflow would have given it. Never over an
  existing file; another MLflow version, or no such file, creates the store as usual. The test suite sets it for its
  hundred-odd short runs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from typing import Any

from monai.handlers import MLFlowHandler

from bundle.files import write_text_atomic
from bundle.runtime import process_rank

__all__ = [
    "RUN_NAME_FILE",
    "ResumableMLFlowHandler",
    "TEMPLATES_ENV",
    "make_sqlite_template",
    "seed_sqlite_store",
    "tracking_run_name",
]

RUN_NAME_FILE = "run_name.txt"
TEMPLATES_ENV = "BUNDLE_MLFLOW_TEMPLATES"
_SQLITE = "sqlite:///"


def _template_name() -> str:
    import mlflow

    return f"mlflow-{mlflow.__version__}.db"


def make_sqlite_template(folder: str) -> str:
    """An empty SQLite store migrated by this MLflow version, ``<folder>/mlflow-<version>.db`` (made if missing)."""
    from mlflow.tracking import MlflowClient

    path = os.path.join(folder, _template_name())
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f".partial-{os.getpid()}.db")
        MlflowClient(tracking_uri=_SQLITE + os.path.abspath(partial)).search_experiments()
        os.replace(partial, path)
    return path


def seed_sqlite_store(tracking_uri: str | None) -> bool:
    """Start the SQLite store of ``tracking_uri`` as a copy of this MLflow version's template (module docstring):
    only where ``BUNDLE_MLFLOW_TEMPLATES`` holds one and the store's file does not exist. True if it was seeded."""
    folder = os.environ.get(TEMPLATES_ENV)
    if not folder or not tracking_uri or not str(tracking_uri).startswith(_SQLITE):
        return False
    path = str(tracking_uri)[len(_SQLITE) :].split("?", 1)[0]
    template = os.path.join(folder, _template_name())
    if not path or os.path.exists(path) or not os.path.isfile(template):
        return False
    partial = f"{path}.{os.getpid()}.partial"
    try:  # best effort: where the copy cannot be made (say, a folder without write access) MLflow reports it itself
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.copyfile(template, partial)
        with sqlite3.connect(partial) as db:  # where MLflow puts the Default experiment's artifacts: ./mlruns/0
            db.execute(
                "update experiments set artifact_location = ? where experiment_id = 0",
                (os.path.abspath(os.path.join("mlruns", "0")),),
            )
        db.close()
        os.link(partial, path)  # never over a store that appeared meanwhile (another rank, another process)
    except (OSError, sqlite3.Error):
        return False
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return True


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

    def __init__(self, tracking_uri: str | None = None, *args: Any, **kwargs: Any) -> None:
        seed_sqlite_store(tracking_uri)
        super().__init__(tracking_uri, *args, **kwargs)

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
