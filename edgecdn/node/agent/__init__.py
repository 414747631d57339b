"""The deploy agent: the only program a node's deploy key can run.

Installed on every node byte for byte as reviewed here (with edgecdn/contract.py), and started
by launcher.py. Standard library and Debian's python3-brotli only.
"""
