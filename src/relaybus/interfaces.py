"""The seams of relaybus. Each interface has a fake in relaybus.testing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from relaybus.errors import RelaybusError
from relaybus.messages import CancelNotice, Delivery, ReplyMessage, RequestMessage


class IReplyReceiver(Interface):
    """The gateway side of a bus: where replies and connection loss are reported."""

    def replyReceived(reply: ReplyMessage) -> None:
        """A ReplyMessage addressed to this gateway arrived."""

    def busInterrupted(reason: Failure | None) -> None:
        """The broker connection was lost: every request in flight is now orphaned."""


class IRequestBus(Interface):
    """What a gateway needs from a message bus."""

    replyTo = Attribute("The address workers send this gateway's replies to.")

    def listen(receiver: IReplyReceiver) -> None:
        """Deliver replies and interruptions to `receiver` (an IReplyReceiver)."""

    def isReady() -> bool:
        """True when requests can be published right now."""

    def publishRequest(message: RequestMessage) -> Deferred[None]:
        """Publish a RequestMessage.

        Returns a Deferred that fires once the bus has taken the request, or fails with a
        RelaybusError: no_handler (nobody serves its requestType), unavailable, overloaded.
        """

    def publishCancel(notice: CancelNotice) -> None:
        """Tell workers a CancelNotice; best effort, returns nothing."""

    def consumersOf(requestType: str) -> Deferred[int | None]:
        """How many workers consume requestType's requests right now, as the broker counts
        them; None when the bus cannot tell (not connected, no such queue, or a bus whose
        workers cannot vanish)."""


class IRequestReceiver(Interface):
    """The worker side of a bus: where requests and cancellations are delivered."""

    def requestReceived(delivery: Delivery) -> None:
        """A Delivery to handle; the receiver must ack or requeue it exactly once."""

    def cancelReceived(notice: CancelNotice) -> None:
        """A CancelNotice for a request this worker may be running."""

    def busInterrupted(reason: Failure | None) -> None:
        """The broker connection was lost: unsettled deliveries will be redelivered."""


class IWorkerBus(Interface):
    """What a worker process needs from a message bus."""

    def serve(requestTypes: Iterable[str], receiver: IRequestReceiver, prefetch: int) -> None:
        """Start delivering requests of these types to an IRequestReceiver.

        At most `prefetch` deliveries are unsettled at once.
        """

    def stopServing(receiver: IRequestReceiver) -> Deferred[None]:
        """Stop delivering new requests to `receiver`; those in hand can still be settled.

        Returns a Deferred that fires once no further delivery can arrive.
        """

    def isReady() -> bool:
        """True when replies can be published right now."""

    def publishReply(reply: ReplyMessage) -> Deferred[None]:
        """Publish a ReplyMessage; returns a Deferred that fires once the bus has taken it,
        and fails with ReplyRefusedError when the broker refused it (a nack) or with a
        RelaybusError `unavailable` when it was lost (no connection, channel closed)."""


class IRequestStream(Interface):
    """Handed to a request handler: the way to send intermediate chunks."""

    def sendChunk(data: Any) -> Any:
        """Send one JSON-serialisable chunk, in the handler's world (relaybus.handlerworlds).

        On the reactor it returns a Deferred; in an asyncio handler an asyncio Future; in a
        blocking handler's thread it returns None (and raises CancelledError once the request
        has ended). Each fires at once while fewer than relaybus.worker.CHUNK_WINDOW chunks of
        the request await the broker's confirm, and otherwise once the oldest is confirmed:
        back-pressure without a broker round trip per chunk. A chunk the broker refuses ends
        the request with handler_error; the handler is stopped.
        """


class IRequestHandler(Interface):
    """A worker component serving one requestType."""

    requestType = Attribute("The requestType this handler serves.")
    idempotent = Attribute(
        "True if running a request twice is harmless: redelivered requests are then run "
        "again instead of ending with worker_lost.")

    def handle(request: Any, stream: IRequestStream) -> Any:
        """Serve one HandlerRequest (payload, deadline, ...), streaming chunks to an IRequestStream.

        Serve it: return the final response data, a Deferred of it, or a coroutine. Where it
        runs is the handler's optional `runsIn` attribute (not part of this interface, so
        existing handlers need none): "twisted" (the default: on the reactor, coroutines
        awaiting Deferreds), "asyncio" (an `async def` run as an asyncio Task; needs the
        asyncio reactor), "thread" (a blocking plain `def`, run in the thread pool).

        Raise RelaybusError to choose the error code; any other exception becomes
        handler_error. Cancelling the returned Deferred must stop the work.
        """


class IClientConnection(Interface):
    """One client's WebSocket, as the correlation table sees it.

    The table hands it a request's chunks, response and error; the connection (the WebSocket
    edge) owns their wire format and the client's maxMessageBytes. A chunk or response that
    cannot be sent raises RelaybusError and sends nothing: `payload_too_large` when its frame
    would be larger than maxMessageBytes, `handler_error` when the data cannot be encoded as
    JSON. The table then ends the request with that error, once: a refused chunk ends it and
    tells the workers (a cancel notice with the code as its reason); a refused response is
    answered with `sendError` instead. `sendError` never refuses: an error whose frame would
    be too large keeps its code and gets a short message. Once the connection is closing,
    whatever passes these checks is dropped silently.
    """

    connectionId = Attribute("Unique id of this connection (also sent in the hello frame).")
    principal = Attribute(
        "The relaybus.identity.Principal its handshake proved; None when the gateway has no "
        "keys. Workers learn its `sub` as the relaybus-principal header.")

    def sendChunk(requestId: str, seq: int, data: Any) -> None:
        """Send chunk number `seq` of a request; raises RelaybusError when it cannot be sent."""

    def sendResponse(requestId: str, data: Any) -> None:
        """Send a request's final response; raises RelaybusError when it cannot be sent."""

    def sendError(requestId: str, error: RelaybusError) -> None:
        """Send a request's final error (a RelaybusError); never raises for size or content."""


class IJWKSFetcher(Interface):
    """How the gateway gets the JWK Set document of --jwks-url (relaybus.jwks)."""

    def fetch() -> Deferred[bytes]:
        """The document's body.

        Fails with relaybus.jwks.JWKSFetchError, whose message is a short reason that is
        safe to log (never the body, never the URL's query). Cancelling the Deferred aborts
        the transfer.
        """
