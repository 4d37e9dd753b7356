"""The HTTP layer the API and gateway_auth share (aiohttp).

- ``middlewares``: request id, request metrics, every error as an RFC 9457 problem;
- ``tls``: the internal hop's server TLS context and the peer's certificate;
- ``body``: reading a JSON body and validating it into a pydantic model, with the
  one way of naming an invalid field (``events[3].payload.health``);
- ``database``: an unreachable database as a 503 problem with ``Retry-After``;
- ``run``: the ``python -m`` entry block (arguments, settings, TLS, waiting for
  dependencies, ``web.run_app`` with a graceful stop).
"""
