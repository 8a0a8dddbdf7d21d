# twistd -ny relay.tac  (configuration path from SMTPRELAY_CONFIG)
import os

from twisted.application.service import Application
from twisted.internet import reactor

from smtprelay.config import load
from smtprelay.service import makeService

application = Application("smtprelay")
makeService(load(os.environ.get("SMTPRELAY_CONFIG", "/etc/smtprelay/relay.conf")), reactor).setServiceParent(application)
