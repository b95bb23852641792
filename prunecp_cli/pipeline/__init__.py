"""The pipeline steps behind the API: open, score, prune."""
