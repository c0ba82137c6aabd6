"""Per-client rate limits: a token bucket per client in Redis, shared by every gateway.

Each client (an API key's scope, or the client IP when keys are off) has ``burst`` tokens that refill at
``rate`` per second; a request takes one. One Lua script reads, refills and takes atomically on the
Redis clock, so gateways on several machines share one limit without clock skew. A bucket left alone
expires once it would be full again.
"""

from __future__ import annotations

import math

from redis import Redis

from service.contract.errors import RateLimited

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst. Returns 0 when allowed, else the wait in ms.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
if tokens < 1 then
  return math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return 0
"""


class RateLimiter:
    def __init__(self, redis: Redis, *, prefix: str, rate_per_second: float, burst: int) -> None:
        self.prefix = prefix
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._take = redis.register_script(_TAKE)

    def take(self, client: str) -> None:
        """Spend one of ``client``'s tokens or raise :class:`RateLimited`."""
        wait_ms = int(
            self._take(keys=[f"{self.prefix}:rate:{client}"], args=[self.rate_per_second, self.burst])
        )
        if wait_ms:
            raise RateLimited(max(1, math.ceil(wait_ms / 1000)))
