"""Input/output used by every layer and using none: atomic writes and locks, slide readers, run-folder paths, environment checks."""
