"""What the ``leap`` commands do beyond distilling, each a library module the command wraps
(:mod:`leap.cli`): the report of a run (:mod:`~leap.apps.report`, figures in
:mod:`~leap.apps.plotting`), training the demo teacher (:mod:`~leap.apps.pretrain`), the demo
(:mod:`~leap.apps.demo`) and the seeded experiment (:mod:`~leap.apps.experiment`, its tables and
plots in :mod:`~leap.apps.experiment_report`).
"""
