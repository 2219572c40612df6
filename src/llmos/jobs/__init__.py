"""Durable jobs: a queue in the database, one worker subprocess per job, checkpoints and resume."""
