# The gateway as a .tac (e.g. under systemd: `twistd --nodaemon --pidfile= -y relaybus.tac`).
# A .tac gets no command-line arguments: configure it with RELAYBUS_* environment variables,
# one per `twistd relaybus` option (see the README), e.g. RELAYBUS_BROKER=amqp://... .
from twisted.application.service import Application

from relaybus.options import GatewayOptions
from relaybus.service import (
    GatewayService,
    exitZeroOnSigterm,
    reloadOnSighup,
    tuneGarbageCollector,
)

options = GatewayOptions.fromEnvironment()
exitZeroOnSigterm()
tuneGarbageCollector()
reloadOnSighup(options.authorizer)
application = Application("relaybus")
GatewayService(options.config, options.registry, checker=options.checker,
               authorizer=options.authorizer).setServiceParent(application)
