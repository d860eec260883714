"""Wire contracts and their generated Python code."""
