"""Offline reports of learnscope runs: read TensorBoard event files into typed
records (:mod:`~learnscope.report.reader`), test synchronisation across layers
(:mod:`~learnscope.report.sync`), summarise (:mod:`~learnscope.report.summary`),
and draw figures (:mod:`~learnscope.report.figures`, needs matplotlib).

Command line: ``learnscope report LOGDIR [--out DIR]``.
"""

from learnscope.report.reader import LogdirRecords, RunRecords, parse_tag, read_logdir
from learnscope.report.summary import RunSummary, SyncSettings, summarise_run
from learnscope.report.sync import SyncError, SyncResult, synchronisation_test

__all__ = [
    "LogdirRecords",
    "RunRecords",
    "RunSummary",
    "SyncError",
    "SyncResult",
    "SyncSettings",
    "parse_tag",
    "read_logdir",
    "summarise_run",
    "synchronisation_test",
]
