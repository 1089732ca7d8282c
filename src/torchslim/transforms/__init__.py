"""One file per technique: a frozen config and one verb each. A trailing ``_`` mutates in place."""
