# The twistd plugins: "smtprelay" (the relay) and "smtprelay-sink" (a capture sink).
from twisted.application.service import ServiceMaker

smtprelay = ServiceMaker(
    "smtprelay", "smtprelay.app.tap", "A transparent, queue-less SMTP & LMTP relay.", "smtprelay"
)
smtprelaySink = ServiceMaker(
    "smtprelay-sink", "smtprelay.sink.tap", "A capture sink: writes every message to a directory.", "smtprelay-sink"
)
