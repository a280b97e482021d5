"""A training run of ``leap distill``, one concern per module:

- :mod:`~leap.run.build`: what a run is built from (data, models, optimizer and schedule);
- :mod:`~leap.run.loop`: :class:`~leap.run.loop.Trainer`, the loop (resume, steps, epoch ends,
  checkpoints, summary), and :func:`~leap.run.loop.train`;
- :mod:`~leap.run.guard`: the run-directory lock, stop signals, kept checkpoints, divergence stops;
- :mod:`~leap.run.stats`: the typed ``StepResult`` / ``RunStats``;
- :mod:`~leap.run.timing`: measured step times and the wall-clock saving of a trajectory.

Library use: ``from leap.run.loop import train`` (also ``leap.Trainer``).
"""
