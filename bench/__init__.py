"""The deploy benchmark (python -m bench.run)."""
