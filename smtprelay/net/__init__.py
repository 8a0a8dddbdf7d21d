"""
The network edge: endpoints, TLS contexts and their judgement, writing now.
"""
