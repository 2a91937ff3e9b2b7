"""Issue 9's fault and load scenarios; ``bench/reliability.py`` runs their long versions."""
