"""conformal subpackage of prunecp."""
