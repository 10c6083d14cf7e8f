"""Core's own plugins. They register through the same hooks as third-party plugins.

Each module is torch-free at import time (implementations are imported inside factories), so
listing plugins and checking recipes stays fast.
"""
