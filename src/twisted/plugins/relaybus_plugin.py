# No reactor import here: twistd loads plugins before it installs the reactor (-r).
from twisted.application.service import ServiceMaker

relaybusGateway = ServiceMaker(
    "relaybus gateway", "relaybus.tap", "WebSocket-to-worker gateway (embedded bus by default).",
    "relaybus")
relaybusWorker = ServiceMaker(
    "relaybus worker", "relaybus.tap_worker", "relaybus request handlers served from RabbitMQ.",
    "relaybus-worker")
