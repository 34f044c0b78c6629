"""The engine: worker loop, step implementations per credential kind, operator service.

It depends on the domain and on the ports only; the CLI wires adapters in.
"""
