"""importance subpackage of prunecp."""
