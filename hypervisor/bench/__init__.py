"""Benchmarks behind `hvlab bench`: the emulator, typeref revalidation, live updates.

Each prints ratios, never absolute times alone.
"""
