"""The pool's one vocabulary: checked frames and the typed messages that travel in them.

The bottom of the import order: nothing here imports another meshpool package."""
