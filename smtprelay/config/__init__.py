"""
Configuration: maddy's syntax (docs/configuration.md) parsed into the frozen tree of
L{smtprelay.config.model}.
"""

from smtprelay.net.address import parseAddress

from .lexer import ConfigError
from .parser import defaultHostname, load, loadString
from .permissions import secretFileWarnings
from .show import show

__all__ = [
    "ConfigError", "defaultHostname", "load", "loadString", "parseAddress", "secretFileWarnings",
    "show",
]
