"""
The inbound side: the SMTP/LMTP server session, its limits, PROXY protocol, local users.
"""
