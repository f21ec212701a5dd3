"""What a run records: ``metrics.csv`` (rewritten atomically), TensorBoard events, a learning-curve PNG."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from so3krates.files import atomic_path, save_figure


class History:
    """One row per validation; survives a resume by re-reading ``metrics.csv``."""

    def __init__(self, run_dir: Path, use_tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as handle:
                self.rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        self._writer = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def truncate(self, epoch: int) -> None:
        """Drops rows after ``epoch`` (a resume from an earlier checkpoint repeats them)."""
        self.rows = [row for row in self.rows if row["epoch"] <= epoch]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float):
                    self._writer.add_scalar(key.replace("_", "/", 1), value, global_step=int(row["step"]))
            self._writer.flush()
        self._write_csv()

    def _write_csv(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [key for key in row if key not in fields]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_path(self.csv_path) as tmp:
            tmp.write_text(buffer.getvalue())

    def plot(self) -> Path | None:
        """Writes ``learning_curve.png``: training loss and validation force/energy MAE per epoch."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in self.rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].semilogy(epochs, [row["train_loss"] for row in self.rows], label="train loss")
        if "valid_loss" in self.rows[0]:
            axes[0].semilogy(epochs, [row["valid_loss"] for row in self.rows], label="valid loss")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("loss")
        axes[0].legend()
        for key, label in (
            ("valid_forces_mae_meV_per_A", "valid force MAE / meV/Å"),
            ("valid_energy_mae_meV", "valid energy MAE / meV"),
        ):
            if key in self.rows[0]:
                axes[1].semilogy(epochs, [row[key] for row in self.rows], label=label)
        axes[1].set_xlabel("epoch")
        axes[1].legend()
        fig.tight_layout()
        path = self.run_dir / "learning_curve.png"
        save_figure(fig, path, dpi=110)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
