"""Worker runners started as subprocesses by bench/workers.py (one per client under test)."""
