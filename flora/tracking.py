"""Optional experiment tracking (``report_to``), in local files under the out dir, through the trackers' own
libraries: ``tensorboard`` (``torch.utils.tensorboard``; ``OUT/tensorboard``, view with ``tensorboard
--logdir OUT/tensorboard``) or ``mlflow`` (a local SQLite store ``OUT/mlflow.db``, view with ``mlflow ui
--backend-store-uri sqlite:///OUT/mlflow.db``). Every round logs the record's numbers (test and train loss, aggregation
error, bytes, seconds, ...) at step = round, each client's train and test loss under ``client_*/K``; the
base model's test loss is step 0. Neither library is a core dependency: extras ``tracking`` (tensorboard) and
``mlflow`` (mlflow-skinny).
"""

from __future__ import annotations

import math
from pathlib import Path

from flora.config import ConfigError, RunConfig

INSTALL = {"tensorboard": "pip install 'flora-llm[tracking]'", "mlflow": "pip install 'flora-llm[mlflow]'"}


def check_tracking(config: RunConfig) -> None:
    """Raise :class:`ConfigError` if ``report_to`` names a tracker whose library is not installed."""
    if config.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"report_to = 'tensorboard': the tensorboard package is not installed ({exc}); "
                              f"{INSTALL['tensorboard']} or set report_to = 'none'") from None
    elif config.report_to == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"report_to = 'mlflow': the mlflow package is not installed ({exc}); "
                              f"{INSTALL['mlflow']} "
                              f"or set report_to = 'none'") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a round record to track: top-level finite numbers, and per-client losses as
    ``client_train_loss/K`` and ``client_test_loss/K``."""
    out = {key: float(value) for key, value in record.items()
           if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"
           and math.isfinite(value)}
    train = record.get("client_train_loss") or {}
    out.update({f"client_train_loss/{k}": float(v) for k, v in train.items() if v is not None and math.isfinite(v)})
    test = record.get("client_test_losses") or {}  # federated evaluation: what each client reported
    out.update({f"client_test_loss/{k}": float(v) for k, v in test.items() if v is not None and math.isfinite(v)})
    return out


class Tracker:
    """No tracking (``report_to = "none"``); the interface of the others."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per FLoRA run (a resumed run continues it: its id is kept in ``OUT/mlflow_run_id``)."""

    def __init__(self, out: Path, config: RunConfig, resume: bool):
        import mlflow
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(out))
        mlflow.set_experiment("flora")
        id_file = out / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{config.method} {out.name}")
        id_file.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in config.to_dict().items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({key.replace("/", "."): value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def tracking_uri(out: Path) -> str:
    """MLflow's store for a run: a SQLite file in the out dir (MLflow 3 refuses its old ``./mlruns`` file store)."""
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def open_tracker(config: RunConfig, resume: bool = False) -> Tracker:
    check_tracking(config)
    out = Path(config.out_dir)
    if config.report_to == "tensorboard":
        return TensorBoardTracker(out)
    if config.report_to == "mlflow":
        return MlflowTracker(out, config, resume)
    return Tracker()
