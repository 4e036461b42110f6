"""The Dagster code location: definitions, resources, schedules, sensors and jobs."""
