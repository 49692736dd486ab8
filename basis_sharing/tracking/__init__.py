"""Run records (results.json) and, later, experiment trackers."""
