"""Debugging a run from outside: the hypervisor as a gdb remote target (`hvlab run --gdb`)."""
