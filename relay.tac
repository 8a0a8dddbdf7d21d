# twistd -ny relay.tac  (configuration path from SMTPRELAY_CONFIG)
import os

from twisted.application.service import Application
from twisted.internet import reactor

from smtprelay.app.tap import DEFAULT_CONFIG, Options, makeService

options = Options()
options.parseOptions(["--config", os.environ.get("SMTPRELAY_CONFIG", DEFAULT_CONFIG)])
application = Application("smtprelay")
makeService(options, reactor).setServiceParent(application)
