"""Tuneboard web side: pages, JSON API and the contract shared with the worker."""
