"""Where the metrics rows go besides metrics.jsonl (which is always written): TensorBoard or W&B (rank 0).

    sinks = open_sinks(cfg.report_to, exp_dir, flat_config, exp_name, project)
    sinks.log(row)        # a metrics row: {"step": ..., "loss": ..., ...}; numeric fields become scalars
    sinks.close()

--report-to auto (the default) writes TensorBoard event files to EXP_DIR/tensorboard when the `tensorboard`
package is installed and nothing else when it is not; tensorboard / wandb ask for one, and a missing
package is an error before training starts, naming what to install. W&B runs keep one id per experiment
folder (EXP_DIR/wandb_id), so a resumed run continues the same W&B run.
"""
from __future__ import annotations

import importlib.util
import os
import uuid


class SinkError(RuntimeError):
    pass


def _numeric(row: dict) -> dict:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, log_dir: str, config: dict, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        # purge_step: a resumed run hides the events a dead run wrote after its last checkpoint
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step + 1 if resume_step else None)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, row: dict) -> None:
        for k, v in _numeric(row).items():
            self.writer.add_scalar(f"train/{k}", v, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, exp_dir: str, config: dict, name: str, project: str):
        import wandb
        id_file = os.path.join(exp_dir, "wandb_id")
        if os.path.exists(id_file):
            run_id = open(id_file).read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config, dir=exp_dir)

    def log(self, row: dict) -> None:
        self.run.log(_numeric(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Sinks:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()

    @property
    def names(self) -> list[str]:
        return [type(s).__name__ for s in self.sinks]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_report_to(report_to: str) -> None:
    """Fail before any work when the asked-for sink's package is missing."""
    if report_to == "tensorboard" and not _installed("tensorboard"):
        raise SinkError("--report-to tensorboard: the `tensorboard` package is not installed "
                        "(pip install tensorboard), or use --report-to none")
    if report_to == "wandb" and not _installed("wandb"):
        raise SinkError("--report-to wandb: the `wandb` package is not installed (pip install wandb), "
                        "or use --report-to none")


def open_sinks(report_to: str, exp_dir: str, config: dict, name: str, project: str = "REPA",
               resume_step: int = 0) -> Sinks:
    check_report_to(report_to)
    if report_to == "tensorboard" or (report_to == "auto" and _installed("tensorboard")):
        return Sinks([TensorBoardSink(os.path.join(exp_dir, "tensorboard"), config, resume_step)])
    if report_to == "wandb":
        return Sinks([WandbSink(exp_dir, config, name, project)])
    return Sinks([])
