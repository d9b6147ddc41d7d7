"""Repositories: one module per aggregate; SQL lives here and nowhere else."""
