"""What a training run shows while it trains (rank 0, with ``--progress``): on a terminal a tqdm
bar per epoch with the loss, block, CKA and throughput (the bar counts every step; its values are the
last ones read back, every ``--log-every`` steps: :mod:`leap.run.readback`); otherwise one log line
every ``--log-every`` steps and at each epoch end."""

from __future__ import annotations

import logging
import sys

from .stats import StepResult

__all__ = ["Progress"]


class Progress:
    """The progress display of one run.

    Args:
        enabled: ``--progress`` and this is the main rank.
        epochs, steps_per_epoch, num_blocks: for the bar's description and the lines.
        log_every: steps between plain lines (0/None: epoch ends only).
        log: the logger of the plain lines.
    """

    def __init__(
        self,
        enabled: bool,
        epochs: int,
        steps_per_epoch: int,
        num_blocks: int,
        log_every: int | None,
        log: logging.Logger,
    ):
        self.enabled, self.epochs, self.steps_per_epoch = enabled, epochs, steps_per_epoch
        self.num_blocks, self.log_every, self.log = num_blocks, log_every, log
        self._bar = None

    def start_epoch(self, epoch: int, step_in_epoch: int) -> None:
        """A bar for ``epoch`` (0-based), ``step_in_epoch`` batches already done (hidden off a terminal)."""
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(
            total=self.steps_per_epoch,
            initial=step_in_epoch,
            disable=not (self.enabled and sys.stderr.isatty()),
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
        )

    def tick(self) -> None:
        """One more step done (its values are shown when they are read back: :meth:`show`)."""
        if self._bar is not None:
            self._bar.update(1)

    def show(self, result: StepResult, step: int, step_in_epoch: int) -> None:
        """Show a step whose values were read back (``step`` in total, ``step_in_epoch`` in its epoch)."""
        if self._bar is not None:
            post = {"loss": f"{result.loss:.4g}", "block": f"{result.block}/{self.num_blocks}"}
            if result.cka is not None:
                post["cka"] = f"{result.cka:.3f}"
            if result.images_per_s:
                post["img/s"] = f"{result.images_per_s:.0f}"
            self._bar.set_postfix(post, refresh=False)
        self._plain_line(result, step, step_in_epoch)

    def _plain_line(self, result: StepResult, step: int, step_in_epoch: int) -> None:
        """Without a terminal (no bar): one line every ``log_every`` steps and at each epoch end."""
        if not self.enabled or sys.stderr.isatty():
            return
        end = step_in_epoch >= self.steps_per_epoch
        if not end and not (self.log_every and step % self.log_every == 0):
            return
        extra = f", cka {result.cka:.3f}" if result.cka is not None else ""
        rate = f", {result.images_per_s:.0f} img/s" if result.images_per_s else ""
        self.log.info(
            f"epoch {result.epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
            f"(total {step}): loss {result.loss:.4g}, block {result.block}/{self.num_blocks}{extra}{rate}"
            + (" [epoch end]" if end else "")
        )

    def close(self) -> None:
        """Close the bar, if any (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
