"""YAML recipes: a pydantic schema (unknown keys are errors) and a straight-line runner."""
