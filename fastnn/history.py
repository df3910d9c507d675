"""What ``fit`` measured (History) and shows while it runs (the progress bar)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class History:
    """What ``fit`` measured, one entry per epoch."""

    loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    epochs_run: int = 0
    samples_per_second: float = 0.0
    seconds: float = 0.0
    # Training seconds of each epoch (validation not counted); epochs run in
    # one compiled call share its time evenly.
    epoch_seconds: list = field(default_factory=list)
    samples_per_epoch: int = 0
    # How the steps ran: "per-op", "compiled" (CPU, whole epochs per call),
    # "cuda-kernel" (tiny nets, one launch) or "cuda-graph"; "per-op (...)"
    # says why no faster path applied.
    step_path: str = ""

    @property
    def steady_samples_per_second(self) -> float:
        """Throughput after the first epoch: without the one-time costs it
        carries (loading or compiling JIT kernels, a GPU's warm-up and graph
        recording). With one epoch, ``samples_per_second``."""
        later = sum(self.epoch_seconds[1:])
        if len(self.epoch_seconds) < 2 or later <= 0:
            return self.samples_per_second
        return self.samples_per_epoch * (len(self.epoch_seconds) - 1) / later

    def plot(self, path) -> None:
        """Write the loss curve(s) as a PNG (needs matplotlib: ``pip install 'fastnn[plot]'``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("History.plot needs matplotlib: pip install 'fastnn[plot]'") from exc
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = range(1, len(self.loss) + 1)
        ax.plot(epochs, self.loss, label="training loss")
        if self.val_loss:
            ax.plot(range(1, len(self.val_loss) + 1), self.val_loss, label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        if self.loss and min(self.loss) > 0 and max(self.loss) / min(self.loss) > 50:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)


class Progress:
    """tqdm bar on a terminal only; loss read from the device at most ~5x/s."""

    def __init__(self, enabled: bool, total: int, epochs: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", unit_scale=True, dynamic_ncols=True,
                            leave=True, file=sys.stderr)
        self.epochs = epochs
        self.last = 0.0

    def update(self, epoch: int, n: int, mean_loss) -> None:
        """``mean_loss()`` is called only when the bar refreshes (a device read)."""
        if self.bar is None:
            return
        self.bar.update(n)
        self.latest = (epoch, mean_loss)
        now = time.perf_counter()
        if now - self.last > 0.2:
            self.last = now
            self._describe(epoch, mean_loss)

    def _describe(self, epoch: int, mean_loss) -> None:
        self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{mean_loss():.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            if getattr(self, "latest", None) is not None:
                self._describe(*self.latest)  # the bar's last line shows the last epoch
            self.bar.close()
