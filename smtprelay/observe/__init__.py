"""
What the relay tells its operator: log lines, metrics.
"""
