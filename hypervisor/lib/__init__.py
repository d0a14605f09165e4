"""Leaf helpers every layer may use: the user-error type, Xen errno values, runs of values.

Like Xen's lib/: imports nothing else from hypervisor/.
"""
