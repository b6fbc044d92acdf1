"""One router per resource: health (health, ready, metrics), predict, jobs."""
