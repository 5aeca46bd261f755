-- keygate's GCRA in Redis: the same algorithm, state and rounding as the in-process governor
-- limiter (governor 0.10 `Gcra::test_and_update`), so both answer with the same headers.
--
-- KEYS[1]  the bucket, e.g. "keygate:<key id>:rate"
-- ARGV[1]  t: microseconds to earn back one request (>= 1)
-- ARGV[2]  burst: requests that may arrive at once on a full budget (>= 1)
-- returns  {1, remaining} when admitted, {0, wait in microseconds} when refused
--
-- The clock is the Redis server's (TIME), so instances with skewed clocks still agree.
-- Times are whole microseconds since the epoch (~1.8e15), exact in Lua's doubles (< 2^53).
local t = tonumber(ARGV[1])
local tau = t * (tonumber(ARGV[2]) - 1)
local now = redis.call('TIME')
local t0 = tonumber(now[1]) * 1000000 + tonumber(now[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or t0
local earliest = tat - tau
if t0 < earliest then
  return {0, earliest - t0}
end
local next = math.max(tat, t0) + t
-- Once next has passed, the state is the same as no state: let Redis forget it then.
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - t0) / 1000))
return {1, math.floor(math.min(t0 + tau + t - next, tau + t) / t)}
