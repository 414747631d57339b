"""Everything that runs on a node or is rendered for one: the deploy agent, node files, bootstrap.

This file is installed on every node beside the agent; it stays free of imports.
"""
