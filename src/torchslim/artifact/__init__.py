"""The `.tslim` artifact: codecs, save and load (spec: docs/format.md)."""
