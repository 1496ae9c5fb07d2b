"""The scheduler: takes inference requests off JetStream by priority and dispatches them to engines.

Pure logic, no I/O: ``selection`` (which engine), ``placement`` (capacity net of this
replica's own unanswered dispatches), ``lanes`` (which lane to take from, how many),
``routing`` (what to do with one message) and ``recent`` (remembered request ids).
On the bus: ``workers`` feeds the worker table from heartbeats, ``dispatch`` hands one message
to engines and settles it with JetStream, ``status`` is the NATS micro service, and
``service`` runs the take loop and owns the subscriptions. ``config`` and ``metrics`` hold the
strict configuration and the Prometheus metrics; ``engine_double`` is a test double only.
"""
