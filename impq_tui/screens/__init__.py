"""Screens of the Textual app: setup, dashboard, export, and small modals."""
