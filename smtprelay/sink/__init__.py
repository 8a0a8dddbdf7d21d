"""
The capture sink: a server on the inbound engine that writes every message to a directory.
"""
