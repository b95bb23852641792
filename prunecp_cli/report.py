"""Moved: the ``report`` step is :mod:`prunecp_cli.pipeline.report`, its rendering :mod:`prunecp_cli.present`.

This module re-exports the step and its result types for existing imports.
"""

from prunecp_cli.pipeline.report import PROVENANCE_KEYS, LayerRow, ReportData, report

__all__ = ["PROVENANCE_KEYS", "LayerRow", "ReportData", "report"]
