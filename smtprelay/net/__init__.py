"""
The network edge: addresses, endpoints, TLS contexts and their judgement,
writing now.  This package's own module imports nothing, so that the
configuration may use the plain values of L{smtprelay.net.address}.
"""
