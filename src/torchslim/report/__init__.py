"""Report data -> JSON and Markdown."""
