"""io subpackage of prunecp."""
