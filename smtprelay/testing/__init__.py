"""
Public test fakes for smtprelay and its users: a scripted downstream SMTP/LMTP
server (L{smtprelay.testing.downstream}) and a recording relay handler
(L{smtprelay.testing.handler}), plus helpers to wire them in memory.
"""
