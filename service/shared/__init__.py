"""State shared by every worker and replica through Redis (``REDIS_URL``), behind the same
interfaces as the in-process state: tenant limits (:class:`service.guard.limits.LimitStore`),
circuit breakers, Modal warmth and the one wake-up lease (:class:`service.routing.health.SharedHealth`).

Redis is never on the critical path of availability: when it cannot be reached, calls go on with
this process's own state (limits fail open to the in-process buckets) and the shared state resumes
when Redis answers again (:mod:`service.shared.client`)."""
