"""The impq-tui engine: SPQE, interactions, the SCIP solver, backends, evaluation.

Nothing in this package imports Textual; the app and the headless CLI listen to the
engine through the callback and event dataclasses of ``core.events``.
"""
