"""State backends behind small interfaces: rate-limit counters and the response cache, in memory
(default, one process) or in Redis (shared by every worker and replica)."""
