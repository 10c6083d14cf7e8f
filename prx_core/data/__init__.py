"""Data sources for prx: offline toy datasets and caption selection."""
