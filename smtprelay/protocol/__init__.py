"""
SMTP values: the reply catalogue, addresses, the body scanner and stuffer.
"""
