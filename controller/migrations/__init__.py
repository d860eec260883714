"""Alembic migrations of the controller database."""
