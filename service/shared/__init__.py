"""Scale-out: several gateway processes on one port (:mod:`service.shared.workers`, ``WORKERS``),
and the state they and other replicas share through Redis (``REDIS_URL``), behind the same
interfaces as the in-process state: tenant limits (:class:`service.guard.limits.LimitStore`,
:mod:`service.shared.limits`), circuit breakers, Modal warmth and the one wake-up lease
(:class:`service.routing.health.SharedHealth`, :mod:`service.shared.health`).

Redis is never on the critical path of availability: when it cannot be reached, calls go on with
this process's own state (limits fail open to the in-process buckets) and the shared state resumes
when Redis answers again (:mod:`service.shared.client`)."""
