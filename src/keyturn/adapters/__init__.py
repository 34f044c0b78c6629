"""Adapters: implementations of the ports (store, provider, keys, vault, deploy targets)."""
