"""Rendering: tables, JSON and CSV for people and scripts, and figures."""
