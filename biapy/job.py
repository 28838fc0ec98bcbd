"""Where one run writes: the results tree of DIR/NAME/, with NAME_ID for this run."""
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    result_dir: Path
    name: str
    run_id: int

    @property
    def id(self) -> str:
        return f"{self.name}_{self.run_id}"

    @property
    def job_dir(self) -> Path:
        return Path(self.result_dir) / self.name

    @property
    def config_files(self) -> Path:
        return self.job_dir / "config_files"

    @property
    def checkpoint_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    def checkpoint(self, which) -> Path:
        """'best', 'last' or an epoch number -> NAME_ID-checkpoint-<which>.pth."""
        return self.checkpoint_dir / f"{self.id}-checkpoint-{which}.pth"

    @property
    def results(self) -> Path:
        return self.job_dir / "results" / self.id

    @property
    def resolved_config(self) -> Path:
        return self.results / "config.yaml"

    @property
    def charts(self) -> Path:
        return self.results / "charts"

    @property
    def aug(self) -> Path:
        return self.results / "aug"

    @property
    def mae_checks(self) -> Path:
        return self.results / "MAE_checks"

    @property
    def per_image(self) -> Path:
        return self.results / "per_image"

    @property
    def metrics_csv(self) -> Path:
        return self.results / "test_results_metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.results / "tensorboard"

    @property
    def train_logs(self) -> Path:
        return self.results / "train_logs"

    @property
    def lock_file(self) -> Path:
        """Locked by the process that runs NAME_ID (biapy.runner.lock_run); hidden, empty once the run ended."""
        return self.job_dir / f".{self.id}.lock"
