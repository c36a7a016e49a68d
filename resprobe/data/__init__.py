"""Data: data specs and sources (folders, arrays, tar, hfds), preprocessing, loaders, device decode."""
