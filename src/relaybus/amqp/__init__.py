"""The RabbitMQ bus, on pika's Twisted adapter: the one place the gateway and worker use pika.

Split along the data flow, so each piece can be read (and tested) alone:

- `codec`: relaybus messages <-> AMQP properties and headers (pure; the wire contract).
- `topology`: exchange and queue names, and how they are declared.
- `brokerurl`: broker URLs checked at start, and Twisted's TLS options for amqps://.
- `link`: one reconnecting AMQP connection (`BrokerLink`) and the pika traps it handles.
- `gatewaybus`: `AmqpRequestBus`, a gateway's publishing requests and consuming replies.
- `workerbus`: `AmqpWorkerBus`, a worker's consuming requests and publishing replies.

Every AMQP name, property and header is part of docs/protocol.md ("The AMQP contract").
"""
