"""
The inbound side: one client connection, from listener policy to the relay
handler.

C{policy} (plain values the app builds from the configuration) → C{factory}
(admits under C{limits} and C{ratelimit}; C{proxyproto} in front) →
C{connection} (the wire: framing and back-pressure in C{framing}) →
C{session} (the dialogue: C{states}, C{sasl}; the message body in
C{transfer}) → L{smtprelay.interfaces.IRelayHandler};
C{users} checks local AUTH passwords.
"""
