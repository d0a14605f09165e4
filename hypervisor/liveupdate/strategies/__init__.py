"""How the new build rebuilds page-type references during a live update.

One module per strategy.
"""
