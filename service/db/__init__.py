"""Database layer: engine factory, models, and the unit of work."""
