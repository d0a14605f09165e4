"""Paravirtualised (PV) guests."""
