"""Shared token buckets in the Redis every API process shares (REDIS_URL), whichever the
broker: app/flow's submit rate of an organization over every API process."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis

from app.config import current_config

# Refill by the server's clock (one clock for every API process), then take `n` if there are.
_TAKE_TOKENS = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= n then
  tokens = tokens - n
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {taken, tostring(tokens)}
"""


@dataclass(frozen=True)
class Bucket:
    taken: bool
    # Tokens left after this call (fractional while refilling).
    tokens: float


@functools.cache
def _bucket_client(url: str) -> redis.Redis:
    # redis-py's pool notices a fork and reconnects: one client per process and URL.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def take_tokens(key: str, rate: float, burst: int, n: int = 1) -> Bucket:
    """Take `n` tokens from the bucket `key` (refilled at `rate` a second up to `burst`), in the
    Redis every API process shares (REDIS_URL); raises BrokerError when it cannot be reached."""
    client = _bucket_client(current_config().redis_url)
    taken, tokens = client.eval(_TAKE_TOKENS, 1, f"runyard:bucket:{key}", rate, burst, n)
    return Bucket(bool(taken), float(tokens))
