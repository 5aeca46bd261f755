-- keygate's GCRA in Redis: the same algorithm, state and rounding as the in-process limiters
-- (governor 0.10 `Gcra::test_and_update` for the rate, quota.rs for the quota), so both answer
-- with the same headers.
--
-- KEYS[1]  the rate bucket, e.g. "keygate:<key id>:rate"
-- KEYS[2]  optional: the quota bucket, e.g. "keygate:<key id>:quota"
-- ARGV[1]  rate t: microseconds to earn back one request (>= 1)
-- ARGV[2]  rate burst: requests that may arrive at once on a full budget (>= 1)
-- ARGV[3]  quota t (with KEYS[2])
-- ARGV[4]  quota size: the whole quota, usable at once (with KEYS[2])
-- returns  {1, rate remaining, quota remaining or -1, quota in use in microseconds or -1} when
--          admitted (the last: time until the quota is whole again, its RateLimit t),
--          {0, wait in microseconds, 1 (rate) or 2 (quota), 0} when refused.
--
-- Both budgets are tested before either is charged: a request refused by one is not charged to
-- the other (the quota is tested first, as in process). The clock is the Redis server's (TIME),
-- so instances with skewed clocks still agree; a stored TAT past a whole budget from now (Redis's
-- own clock stepped back) is capped to it, so such a step refuses no key for longer than t.
-- Times are whole microseconds since the epoch (~1.8e15), exact in Lua's doubles (< 2^53).
local now = redis.call('TIME')
local t0 = tonumber(now[1]) * 1000000 + tonumber(now[2])

local function commit(key, next)
  -- Once next has passed, the state is the same as no state: let Redis forget it then.
  redis.call('SET', key, string.format('%d', next), 'PX', math.ceil((next - t0) / 1000))
end

local function test(key, t, burst)
  local tau = t * (burst - 1)
  local tat = tonumber(redis.call('GET', key)) or t0
  -- An admission stores at most its t0 + tau + t (a budget spent whole), so a later TAT than
  -- that was stored on a clock ahead of this one: TIME stepped back, or a failover landed on a
  -- replica whose clock is behind. Read it as a budget spent whole now, and store that, so a
  -- refusal lasts at most t (not the size of the step) and the budget refills from here.
  local spent = t0 + tau + t
  if tat > spent then
    tat = spent
    commit(key, tat)
  end
  local earliest = tat - tau
  if t0 < earliest then
    return false, earliest - t0, 0
  end
  local next = math.max(tat, t0) + t
  return true, next, math.floor(math.min(t0 + tau + t - next, tau + t) / t)
end

local quota_next, quota_remaining = nil, -1
if KEYS[2] then
  local ok, v, r = test(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if not ok then
    return {0, v, 2, 0}
  end
  quota_next, quota_remaining = v, r
end
local ok, v, r = test(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if not ok then
  return {0, v, 1, 0}
end
commit(KEYS[1], v)
local quota_used = -1
if quota_next then
  commit(KEYS[2], quota_next)
  quota_used = quota_next - t0
end
return {1, r, quota_remaining, quota_used}
