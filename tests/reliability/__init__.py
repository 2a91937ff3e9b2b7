"""Issue 9's fault and load scenarios; ``long_run.py`` here runs their long versions."""
