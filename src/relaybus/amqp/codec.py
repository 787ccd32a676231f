"""relaybus messages <-> AMQP properties and headers: the wire half of docs/protocol.md's
AMQP contract, with no connection, channel or reactor in sight (benchmarks reuse it)."""

from __future__ import annotations

from collections.abc import Mapping

import pika

from relaybus.messages import CancelNotice, ReplyKind, ReplyMessage, RequestMessage

HEADER_REQUEST_TYPE = "relaybus-request-type"
HEADER_DEADLINE_MS = "relaybus-deadline-ms"
HEADER_GATEWAY_ID = "relaybus-gateway-id"
HEADER_PRINCIPAL = "relaybus-principal"
HEADER_CLAIMS = "relaybus-claims"
HEADER_SEQ = "relaybus-seq"
HEADER_CANCEL_REASON = "relaybus-cancel-reason"
CONTENT_TYPE = "application/json"
TRANSIENT = 1  # delivery_mode: requests and replies are worthless after their deadline
DEFAULT_CANCEL_REASON = "cancelled"


def _properties(**fields: object) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=TRANSIENT, **fields)


def _headers(properties: pika.BasicProperties) -> Mapping[str, object]:
    return properties.headers or {}


def requestProperties(message: RequestMessage, now: float) -> pika.BasicProperties:
    """The per-message TTL is what is left until the deadline (at least 1 ms), so a request
    that waited in its queue past the deadline is dropped by the broker, not run."""
    return _properties(
        correlation_id=message.correlationId, reply_to=message.replyTo, type="request",
        expiration=str(max(1, int((message.deadline - now) * 1000))), timestamp=int(now),
        headers={
            HEADER_REQUEST_TYPE: message.requestType,
            HEADER_DEADLINE_MS: int(message.deadline * 1000),
            HEADER_GATEWAY_ID: message.gatewayId,
            HEADER_PRINCIPAL: message.principal,
            HEADER_CLAIMS: None if message.claims is None else message.claims.decode("utf-8"),
        })


def requestFromAmqp(routingKey: str, properties: pika.BasicProperties,
                    body: bytes) -> RequestMessage | None:
    """None when it cannot be answered (no correlation_id or reply_to). Headers of the wrong
    type count as absent: a deadline that is not an integer means none."""
    if not properties.correlation_id or not properties.reply_to:
        return None
    headers = _headers(properties)
    deadlineMs = headers.get(HEADER_DEADLINE_MS)
    principal = headers.get(HEADER_PRINCIPAL)
    claims = headers.get(HEADER_CLAIMS)
    if isinstance(claims, bytes):  # pika decodes long strings as bytes
        claims = claims.decode("utf-8", "replace")
    return RequestMessage(
        correlationId=properties.correlation_id,
        requestType=routingKey,  # the queue is bound by it: always right
        replyTo=properties.reply_to, body=body,
        deadline=(deadlineMs / 1000 if isinstance(deadlineMs, int)
                  and not isinstance(deadlineMs, bool) else float("inf")),
        gatewayId=str(headers.get(HEADER_GATEWAY_ID) or ""),
        principal=principal if isinstance(principal, str) else None,
        claims=claims.encode("utf-8") if isinstance(claims, str) else None)


def replyProperties(reply: ReplyMessage) -> pika.BasicProperties:
    headers = {HEADER_SEQ: reply.seq} if reply.seq is not None else None
    return _properties(correlation_id=reply.correlationId, type=str(reply.kind),
                       headers=headers)


def replyFromAmqp(properties: pika.BasicProperties, body: bytes,
                  replyTo: str) -> ReplyMessage | None:
    """None without a correlation_id: nothing names the request. A reply that names it but
    breaks the contract (docs/protocol.md, "Replies") carries the violation, so that the
    gateway ends that request rather than drop the reply and leave it to its deadline."""
    correlationId = properties.correlation_id
    if not correlationId:
        return None
    kind = properties.type
    if kind not in ReplyKind._value2member_map_:
        return ReplyMessage(correlationId, replyTo, ReplyKind.ERROR, body, violation=(
            f"a reply of type {shownValue(kind)} (not chunk, response or error)"))
    seq = _headers(properties).get(HEADER_SEQ)
    if kind != ReplyKind.CHUNK or seq is None:
        return ReplyMessage(correlationId, replyTo, ReplyKind(kind), body)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return ReplyMessage(correlationId, replyTo, ReplyKind.CHUNK, body, violation=(
            f"a chunk whose relaybus-seq is {shownValue(seq)} (not an integer >= 0)"))
    return ReplyMessage(correlationId, replyTo, ReplyKind.CHUNK, body, seq)


def shownValue(value: object) -> str:
    """A worker's value in a log line or an error message: its repr, cut short."""
    text = repr(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def cancelProperties(notice: CancelNotice) -> pika.BasicProperties:
    # No content_type: the body is empty, not JSON.
    return pika.BasicProperties(delivery_mode=TRANSIENT, correlation_id=notice.correlationId,
                                type="cancel", headers={HEADER_CANCEL_REASON: notice.reason})


def cancelFromAmqp(routingKey: str, properties: pika.BasicProperties) -> CancelNotice | None:
    if not properties.correlation_id:
        return None
    reason = _headers(properties).get(HEADER_CANCEL_REASON) or DEFAULT_CANCEL_REASON
    return CancelNotice(properties.correlation_id, routingKey, str(reason))
