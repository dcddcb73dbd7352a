"""The recipe a person writes: its schema (schema.py) and its loading with line-numbered errors (load.py)."""
