"""
The C{smtprelay-sink} twistd plugin: C{twistd -n smtprelay-sink --listen
ADDRESS --dir DIR [--lmtp] [--script FILE]}.
"""

from smtprelay.sink.capture import SinkOptions as Options, makeService

__all__ = ["Options", "makeService"]
