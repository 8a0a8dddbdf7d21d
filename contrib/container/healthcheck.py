#!/opt/smtprelay/bin/python
"""
The image's HEALTHCHECK: C{GET /healthz} on the metrics listener that
C{SMTPRELAY_METRICS} names (an unspecified address is asked on loopback);
exit status 0 when it answers 200, else 1 with the reason on stderr.
"""

import os
import sys
import urllib.request
from urllib.parse import urlsplit

address = urlsplit(os.environ.get("SMTPRELAY_METRICS", ""))
host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(address.hostname or "", address.netloc.rsplit(":", 1)[0])
try:
    with urllib.request.urlopen(f"http://{host}:{address.port}/healthz", timeout=10) as response:
        sys.exit(0 if response.status == 200 else 1)
except (OSError, ValueError) as e:
    sys.exit(f"smtprelay: /healthz: {e}")
