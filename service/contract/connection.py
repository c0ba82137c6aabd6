"""Redis clients and the two Redis-backed components, built the same way by the gateway and the workers."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.contract.queue import JobQueue
from service.contract.settings import Settings
from service.contract.store import JobStore

# What a Redis call raises when the server cannot be reached in time: callers degrade or retry.
REDIS_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)


def connect_redis(settings: Settings, *, blocking: bool = False) -> Redis:
    """A client that fails fast (one retry, short timeouts) so an unreachable Redis answers 503 quickly.

    ``blocking`` leaves the socket timeout off for rq's blocking dequeue (BLPOP), which waits longer.
    """
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_seconds,
        socket_timeout=None if blocking else settings.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def connect_async_redis(settings: Settings, *, max_connections: int) -> AsyncRedis:
    """An asyncio client over at most ``max_connections`` connections, for many concurrent readers on
    one event loop. A command waits for a free connection as long as it takes (a burst of readers
    queues; it is not an outage); on the connection, the usual timeouts apply."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=None,
        socket_connect_timeout=settings.redis_timeout_seconds,
        socket_timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
    )
    return AsyncRedis(connection_pool=pool)


def job_store(settings: Settings, redis: Redis) -> JobStore:
    return JobStore(
        redis,
        prefix=settings.key_prefix,
        result_ttl_seconds=settings.result_ttl_seconds,
        heartbeat_ttl_seconds=settings.heartbeat_ttl_seconds,
    )


def job_queue(settings: Settings, redis: Redis) -> JobQueue:
    return JobQueue(
        redis,
        name=settings.queue_name,
        max_length=settings.max_queue_length,
        job_timeout_seconds=settings.job_timeout_seconds,
        ttl_seconds=settings.result_ttl_seconds,
    )
