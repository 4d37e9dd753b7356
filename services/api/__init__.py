"""The API service: agents' and operators' HTTP entry point behind the nginx edge.

It validates input, stamps the identity the edge verified, produces to Kafka and
answers 202 only after the broker acknowledged. It reads fleet state from
PostgreSQL but never writes it (the owning controller is the only writer).
"""
