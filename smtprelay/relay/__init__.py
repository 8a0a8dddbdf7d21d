"""
Between the two sides: the relay session, routing, failover over the targets.
"""
