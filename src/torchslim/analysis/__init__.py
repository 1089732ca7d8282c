"""What is in a model: which layers can be compressed and what they cost. Never mutates."""
