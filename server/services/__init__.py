# SPDX-License-Identifier: Apache-2.0
"""Services: the server's rules over its state, with no HTTP in sight.

Each function takes a SQLAlchemy ``Session`` (and an ``Hsm`` where keys are involved), does one
unit of work and **commits it**, audit record included, before returning. Failures raise
``server.errors`` subclasses after a rollback, except the counters that must survive a failure
(PIN/PUK retries, OTP failures), which are committed before the error is raised.
"""
