"""A gated key-value memory of facts inside the model: each edit is one row, read at the subject."""
