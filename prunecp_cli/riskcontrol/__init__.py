"""riskcontrol subpackage of prunecp."""
