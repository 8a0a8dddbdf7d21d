"""
smtprelay: a transparent, queue-less SMTP & LMTP forwarding relay on Twisted.

Each client transaction is forwarded, while the client waits, to the first
reachable downstream server; the client sees the downstream's own replies.
"""

__version__ = "0.1.0"
