"""surgery subpackage of prunecp."""
