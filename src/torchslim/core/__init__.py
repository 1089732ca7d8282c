"""Configs, plans, data and the model zoo: the vocabulary every other package speaks."""
