"""commands subpackage of prunecp."""
