"""Widgets of the dashboard: progress and budget panes, layer map, interaction grid, plots."""
