"""
The outbound side: the SMTP/LMTP client engine and the client identity it forwards.
"""
