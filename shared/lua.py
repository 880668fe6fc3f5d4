"""The job-state transitions, each one atomic Lua script that checks the state it moves from.

Times come from Redis (``TIME``), so leases and heartbeats use one clock whatever the workers'
clocks say. Key names come from :data:`convoy.shared.keys.LUA`. Every script that ends a job goes
through ``end_job``: it drops the job's steps from the cluster-wide sets and gives every key
of the job its time to live.
"""

from convoy.shared.keys import LUA as _KEYS

#: Upper bounds of the queue-wait histogram's buckets, seconds: a job taken at once to one that
#: waited an hour behind others on a shared cluster (submission to first step running).
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_PRELUDE = _KEYS + "local QUEUE_WAIT_BUCKETS = {" + ", ".join(map(str, QUEUE_WAIT_BUCKETS)) + "}\n" + """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function final(s) return s == 'done' or s == 'failed' or s == 'cancelled' end
local function job_status(j) return redis.call('HGET', k_state(j), 'status') end
local function prune_rates(before)
  local stale = redis.call('ZRANGEBYSCORE', k_rates_seen(), '-inf', '(' .. before, 'LIMIT', 0, 100)
  if #stale > 0 then
    redis.call('HDEL', k_rates(), unpack(stale))
    redis.call('ZREM', k_rates_seen(), unpack(stale))
  end
end
-- Dispatch. A job's steps wait in its ready set until the store sends them; a queue has a window
-- (how many of its steps may be sent and not finished), and each time it has room the next step
-- comes from the highest priority tier with a job ready, and within the tier from the job whose
-- turn it is: deficit round-robin, a job's quantum being its weight (whole steps). A job that
-- joins a ring goes before every job already round it (in the order they joined): a new job's
-- first turn is the next one, which is what bounds a small job's wait behind a big one.
-- Ring scores: a turn number for a job on its first turn, BACK + a turn number once it went round.
local BACK = 2 ^ 40

-- Put job j in queue q's ring of its tier, or take it out, as its state says: it takes turns
-- while it has a step ready on q and fewer steps out than its cap.
local function schedule(j, q)
  local st = k_state(j)
  local p = redis.call('HGET', st, 'priority') or '0'
  local ring = k_ring(q, p)
  local cap = tonumber(redis.call('HGET', st, 'max_running') or '0')
  local js = job_status(j)
  local ok = js and not final(js) and redis.call('ZCARD', k_ready(j, q)) > 0
             and (cap == 0 or redis.call('SCARD', k_sent(j)) < cap)
  if ok then
    if not redis.call('ZSCORE', ring, j) then
      redis.call('ZADD', ring, redis.call('INCR', k_turns(q)), j)
      redis.call('ZADD', k_tiers(q), tonumber(p), p)
    end
  elseif redis.call('ZREM', ring, j) == 1 then
    redis.call('HDEL', st, 'deficit:' .. q)  -- a job that stops taking turns keeps no credit
    if redis.call('ZCARD', ring) == 0 then redis.call('ZREM', k_tiers(q), p) end
  end
end
-- Out of every ring (its priority is about to change, or it ended).
local function unschedule(j)
  local p = redis.call('HGET', k_state(j), 'priority') or '0'
  for _, q in ipairs(QUEUES) do
    if redis.call('ZREM', k_ring(q, p), j) == 1 and redis.call('ZCARD', k_ring(q, p)) == 0 then
      redis.call('ZREM', k_tiers(q), p)
    end
    redis.call('HDEL', k_state(j), 'deficit:' .. q)
  end
end
-- Record step s of job j as sent on q at time t (its message goes out right after the script).
local function mark_sent(j, s, q, t)
  local m = member(j, s)
  redis.call('ZREM', k_ready(j, q), s)
  redis.call('HSET', k_step(j, s), 'state', 'queued', 'queued_at', t, 'sent_at', t)
  redis.call('ZADD', k_pending(q), t, m)
  redis.call('ZADD', k_outstanding(q), t, m)
  redis.call('SADD', k_sent(j), s)
end
-- The step a finish or a hand-back no longer keeps out: room in the window and under the cap.
local function unsend(j, s, q)
  redis.call('ZREM', k_outstanding(q), member(j, s))
  redis.call('SREM', k_sent(j), s)
end
-- Whose turn it is in a ring: the job at its head spends one step of credit, taking its weight
-- in credit when it has less than a step; out of credit, it goes to the back.
local function take_turn(ring, q)
  local j = redis.call('ZRANGE', ring, 0, 0)[1]
  if not j then return nil end
  local st, field = k_state(j), 'deficit:' .. q
  local d = tonumber(redis.call('HGET', st, field) or '0')
  if d < 1 then d = d + tonumber(redis.call('HGET', st, 'weight') or '1') end
  d = d - 1
  redis.call('HSET', st, field, d)
  if d < 1 then redis.call('ZADD', ring, BACK + redis.call('INCR', k_turns(q)), j) end
  return j
end
-- Fill q's window: sends steps while it has room, appending {job, step, task, queue, msg} to out.
local function dispatch(q, t, out)
  local window = tonumber(redis.call('GET', k_window(q)) or '1')
  local free = window - redis.call('ZCARD', k_outstanding(q))
  local guard = 2 * math.min(free, 10000) + 100  -- a bound on the loop whatever the keys say
  while free > 0 and guard > 0 do
    guard = guard - 1
    local top = redis.call('ZREVRANGE', k_tiers(q), 0, 0)[1]
    if not top then break end
    local ring = k_ring(q, top)
    local j = take_turn(ring, q)
    if not j then
      redis.call('ZREM', k_tiers(q), top)
    else
      local s = redis.call('ZRANGE', k_ready(j, q), 0, 0)[1]
      if s then
        mark_sent(j, s, q, t)
        local sk = k_step(j, s)
        out[#out + 1] = j; out[#out + 1] = s; out[#out + 1] = redis.call('HGET', sk, 'task')
        out[#out + 1] = q; out[#out + 1] = redis.call('HGET', sk, 'msg')
        free = free - 1
      end
      schedule(j, q)
    end
  end
  return out
end
local function end_job(j, status, fields, t)
  local st = k_state(j)
  local cur = redis.call('HGET', st, 'status')
  if not cur or final(cur) then return 0 end
  local ttl = tonumber(redis.call('HGET', st, 'ttl') or '604800')
  local f = {'status', status, status .. '_at', t, 'ended_at', t}
  for k, v in pairs(fields) do f[#f + 1] = k; f[#f + 1] = tostring(v) end
  unschedule(j)
  redis.call('HSET', st, unpack(f))
  redis.call('SREM', k_active(), j)
  redis.call('ZADD', k_ended(), t + ttl, j)
  local steps = redis.call('HGETALL', k_steps(j))
  for i = 1, #steps, 2 do
    local m = member(j, steps[i])
    redis.call('ZREM', k_pending(steps[i + 1]), m)
    redis.call('ZREM', k_outstanding(steps[i + 1]), m)
    redis.call('ZREM', k_leases(), m)
    redis.call('ZREM', k_held(), m)
    redis.call('EXPIRE', k_step(j, steps[i]), ttl)
  end
  redis.call('DEL', k_sent(j))
  for _, q in ipairs(QUEUES) do redis.call('DEL', k_ready(j, q)) end
  for _, k in ipairs({k_spec(j), st, k_inputs(j), k_steps(j), k_finished(j), k_failed(j)}) do
    redis.call('EXPIRE', k, ttl)
  end
  local out = redis.call('HGET', st, 'out_key')
  if out and out ~= '' and redis.call('GET', out) == j then redis.call('DEL', out) end
  return 1
end
-- A job's first step runs: its wait since submission, into the histogram of its priority.
local function observe_queue_wait(j, t)
  local st = k_state(j)
  local since = tonumber(redis.call('HGET', st, 'submitted_at') or '')
  if not since then return end
  local v, p, h = math.max(0, t - since), redis.call('HGET', st, 'priority') or '0', k_queue_wait()
  for _, le in ipairs(QUEUE_WAIT_BUCKETS) do
    if v <= le then redis.call('HINCRBY', h, p .. '|' .. string.format('%g', le), 1) end
  end
  redis.call('HINCRBY', h, p .. '|+Inf', 1)
  redis.call('HINCRBY', h, p .. '|count', 1)
  redis.call('HINCRBYFLOAT', h, p .. '|sum', v)
end
local function add_step(j, s, queue, task, msg, params, t)
  redis.call('HSET', k_step(j, s), 'state', 'ready', 'queue', queue, 'task', task, 'msg', msg,
             'params', params, 'ready_at', t, 'deliveries', 0, 'done', 0, 'total', 0)
  redis.call('HSET', k_steps(j), s, queue)
  redis.call('ZADD', k_ready(j, queue), 0, s)
  schedule(j, queue)
end
"""

#: ARGV: job, step, token, worker, pid, lease_s, from status, to status, takeover token.
#: A live lease is taken over only from the holder whose token is ARGV[9] (a dead process of the
#: same worker). -> {outcome, deliveries, attempt}: claimed | capped | busy | already | stopped |
#: unknown. ``attempt`` counts every claim of the step and never goes back (a hand-back returns the
#: delivery, not the attempt): the fencing number of this holder.
CLAIM = _PRELUDE + """
local j, s = ARGV[1], ARGV[2]
local js = job_status(j)
if not js then return {'unknown', '0'} end
if final(js) then return {'stopped', '0'} end
local sk = k_step(j, s)
local state = redis.call('HGET', sk, 'state')
if not state then return {'unknown', '0'} end
if state == 'done' or state == 'failed' then return {'already', '0'} end
if state == 'ready' then return {'early', '0'} end  -- never sent: a forged or replayed message
local m, t = member(j, s), now()
if state == 'running' then
  local deadline = redis.call('ZSCORE', k_leases(), m)
  local takeover = ARGV[9] ~= '' and redis.call('HGET', sk, 'token') == ARGV[9]
  if deadline and tonumber(deadline) > t and not takeover then return {'busy', '0'} end
end
local n = redis.call('HINCRBY', sk, 'deliveries', 1)
local attempt = redis.call('HINCRBY', sk, 'attempt', 1)
local old = tonumber(redis.call('HGET', sk, 'done') or '0')
if old ~= 0 then redis.call('HINCRBY', k_state(j), 'images_done', -old) end
-- A capped delivery holds the step too: the failure it is about to record is fenced like any outcome.
redis.call('HSET', sk, 'state', 'running', 'token', ARGV[3], 'worker', ARGV[4], 'pid', ARGV[5],
           'started_at', t, 'error', '', 'done', 0, 'holder', '')
redis.call('ZADD', k_leases(), t + tonumber(ARGV[6]), m)
redis.call('ZREM', k_pending(redis.call('HGET', sk, 'queue')), m)
redis.call('ZREM', k_held(), m)
if n > tonumber(redis.call('HGET', k_state(j), 'max_deliveries') or '3') then
  return {'capped', tostring(n), tostring(attempt)}
end
if ARGV[8] ~= '' and js == ARGV[7] then
  redis.call('HSET', k_state(j), 'status', ARGV[8], ARGV[8] .. '_at', t)
end
if redis.call('HSETNX', k_state(j), 'first_running_at', t) == 1 then
  observe_queue_wait(j, t)
end
return {'claimed', tostring(n), tostring(attempt)}
"""

_HOLDS = """
local j, s, token = ARGV[1], ARGV[2], ARGV[3]
local sk = k_step(j, s)
if redis.call('HGET', sk, 'token') ~= token or redis.call('HGET', sk, 'state') ~= 'running' then return 'lost' end
if final(job_status(j)) then return 'ended' end
"""

#: ARGV: job, step, token, lease_s, worker. -> ok | lost | ended | draining.
RENEW = _PRELUDE + _HOLDS + """
redis.call('ZADD', k_leases(), 'XX', now() + tonumber(ARGV[4]), member(j, s))
if redis.call('EXISTS', k_draining(ARGV[5])) == 1 then return 'draining' end
return 'ok'
"""

#: ARGV: job, step, token, images done, images/s, worker, rate_ttl_s. The rate also goes to the
#: exporter's per-holder rates, where a holder silent for rate_ttl_s is dropped.
#: -> ok | lost | ended | draining.
PROGRESS = _PRELUDE + _HOLDS + """
local new = tonumber(ARGV[4])
local old = tonumber(redis.call('HGET', sk, 'done') or '0')
if new ~= old then redis.call('HINCRBY', k_state(j), 'images_done', new - old) end
redis.call('HSET', sk, 'done', new, 'images_per_s', ARGV[5])
local t = now()
if new > 0 then redis.call('HSETNX', k_state(j), 'first_batch_at', t) end
redis.call('HSET', k_rates(), token, ARGV[6] .. '|' .. ARGV[5])
redis.call('ZADD', k_rates_seen(), t, token)
prune_rates(t - tonumber(ARGV[7]))
if redis.call('EXISTS', k_draining(ARGV[6])) == 1 then return 'draining' end
return 'ok'
"""

#: ARGV: job, step, token, JSON {field: value}. What a running step says of itself besides images
#: (a training's epoch): written only by its holder. -> ok | lost | ended.
NOTE = _PRELUDE + _HOLDS + """
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', sk, k, tostring(v)) end
return 'ok'
"""

#: ARGV[1]: JSON {job, step, token, outcome, done?, error, fields, job_fields, fail_job, job_error,
#: barrier, next?: {step, queue, task, msg, status, params}}. Only the current holder of a running
#: step decides its outcome: any other caller (a holder whose lease lapsed and was taken over,
#: repaired, or released) is answered ``stale`` and changes nothing. A step that ends leaves its
#: queue's window, so the same script sends the next steps there (and on the next step's queue).
#: -> {answer, then job, step, task, queue, msg of each step to send}; answer: dup | stale | late |
#: failed | wait | next | done | unknown.
FINISH = _PRELUDE + """
local a = cjson.decode(ARGV[1])
local j, s = a.job, a.step
local sk = k_step(j, s)
local state = redis.call('HGET', sk, 'state')
if not state then return {'unknown'} end
if state == 'done' or state == 'failed' then return {'dup'} end
if state ~= 'running' or redis.call('HGET', sk, 'token') ~= a.token then return {'stale'} end
local m, t, q = member(j, s), now(), redis.call('HGET', sk, 'queue')
local f = {'state', a.outcome, 'finished_at', t, 'error', a.error, 'token', ''}
for k, v in pairs(a.fields) do f[#f + 1] = k; f[#f + 1] = tostring(v) end
local js = job_status(j)
local out = {}
if final(js) then
  redis.call('HSET', sk, unpack(f))
  unsend(j, s, q)
  out[1] = 'late'
  return dispatch(q, t, out)
end
if a.done then
  local old = tonumber(redis.call('HGET', sk, 'done') or '0')
  redis.call('HINCRBY', k_state(j), 'images_done', a.done - old)
  f[#f + 1] = 'done'; f[#f + 1] = a.done
end
if a.fields.total then  -- a tar's images, known once it is read, replace the one it was counted as
  local planned = tonumber(redis.call('HGET', sk, 'total') or '0')
  redis.call('HINCRBY', k_state(j), 'images_total', tonumber(a.fields.total) - planned)
end
redis.call('HSET', sk, unpack(f))
redis.call('ZREM', k_leases(), m)
redis.call('ZREM', k_pending(q), m)
redis.call('ZREM', k_held(), m)
unsend(j, s, q)
schedule(j, q)  -- under its cap again
if a.barrier > 0 then
  redis.call('SADD', a.outcome == 'done' and k_finished(j) or k_failed(j), s)
end
if a.outcome == 'failed' and a.fail_job then
  end_job(j, 'failed', {error = a.job_error, failed_step = s}, t)
  out[1] = 'failed'
elseif a.barrier > 0 and redis.call('SCARD', k_finished(j)) + redis.call('SCARD', k_failed(j)) < a.barrier then
  out[1] = 'wait'
else
  local jf = {}
  for k, v in pairs(a.job_fields) do jf[#jf + 1] = k; jf[#jf + 1] = tostring(v) end
  if #jf > 0 then redis.call('HSET', k_state(j), unpack(jf)) end
  if not a.next then
    end_job(j, 'done', {}, t)
    out[1] = 'done'
  elseif redis.call('HEXISTS', k_steps(j), a.next.step) == 1 then
    out[1] = 'wait'
  else
    add_step(j, a.next.step, a.next.queue, a.next.task, a.next.msg, a.next.params, t)
    redis.call('HSET', k_state(j), 'status', a.next.status, a.next.status .. '_at', t)
    out[1] = 'next'
    if a.next.queue ~= q then dispatch(a.next.queue, t, out) end
  end
end
return dispatch(q, t, out)
"""

#: ARGV: job, step, token, mode (stopped | handback), error. -> 1 if this holder released it.
RELEASE = _PRELUDE + """
local j, s = ARGV[1], ARGV[2]
local sk = k_step(j, s)
if redis.call('HGET', sk, 'token') ~= ARGV[3] or redis.call('HGET', sk, 'state') ~= 'running' then return 0 end
local m = member(j, s)
redis.call('ZREM', k_leases(), m)
if ARGV[4] == 'handback' then
  redis.call('HINCRBY', sk, 'deliveries', -1)
  redis.call('HSET', sk, 'state', 'queued', 'token', '', 'error', ARGV[5])
  -- Waiting since it was first queued: a handed-back message goes to the head of its queue, and
  -- must not look younger than the messages it is put before (see OVERTAKEN).
  local since = tonumber(redis.call('HGET', sk, 'queued_at') or '') or now()
  if not final(job_status(j)) then redis.call('ZADD', k_pending(redis.call('HGET', sk, 'queue')), since, m) end
else
  redis.call('HSET', sk, 'state', 'stopped', 'token', '', 'error', ARGV[5])
  unsend(j, s, redis.call('HGET', sk, 'queue'))
end
return 1
"""

#: ARGV: job, status, then field/value pairs. -> 1 if this call ended the job. The room it leaves
#: in the windows is filled by the caller's :data:`DISPATCH`, or the reconcilers' next tick.
END = _PRELUDE + """
local f = {}
for i = 3, #ARGV, 2 do f[ARGV[i]] = ARGV[i + 1] end
return end_job(ARGV[1], ARGV[2], f, now())
"""

#: ARGV: queue, then jobs to (re)place in the queue's rings first (new, or their options changed).
#: -> {job, step, task, queue, msg, ...} of the steps to send: the window filled.
DISPATCH = _PRELUDE + """
for i = 2, #ARGV do schedule(ARGV[i], ARGV[1]) end
return dispatch(ARGV[1], now(), {})
"""

#: ARGV: job, priority, weight, max_running ('' keeps a value). -> {'ended'} for a job that ended,
#: else {'ok', then job, step, task, queue, msg of each step to send}.
# A job's seeded random weights, made by its first worker: the sha256 of the file is recorded once
# (HSETNX: a second maker cannot change what the others verify against), and the spec every
# worker reads from then on carries it. Nothing for a job that is gone.
SETTLE_WEIGHTS = _PRELUDE + """
local j = ARGV[1]
if redis.call('EXISTS', k_spec(j)) == 0 then return false end
if redis.call('HSETNX', k_state(j), 'weights_sha256', ARGV[2]) == 1 then
  redis.call('SET', k_spec(j), ARGV[3], 'KEEPTTL')
end
return redis.call('HGET', k_state(j), 'weights_sha256')
"""

SET_OPTIONS = _PRELUDE + """
local j = ARGV[1]
local js = job_status(j)
if not js or final(js) then return {'ended'} end
unschedule(j)
local names = {'priority', 'weight', 'max_running'}
for i = 2, 4 do
  if ARGV[i] ~= '' then redis.call('HSET', k_state(j), names[i - 1], ARGV[i]) end
end
local t, out = now(), {'ok'}
for _, q in ipairs(QUEUES) do schedule(j, q) end
for _, q in ipairs(QUEUES) do dispatch(q, t, out) end
return out
"""

#: A new step for an ended job (``convoy submit train JOB``): the job lives again.
#: ARGV: job, step, queue, task, msg, params, status, steps to forget (the earlier chain's)...
#: -> 1, or 0 if the job has not ended. The step is ready: the caller's :data:`DISPATCH` sends it.
REOPEN = _PRELUDE + """
local j = ARGV[1]
local js = job_status(j)
if not js or not final(js) then return 0 end
local t = now()
for i = 8, #ARGV do
  redis.call('DEL', k_step(j, ARGV[i]))
  redis.call('HDEL', k_steps(j), ARGV[i])
end
local steps = redis.call('HKEYS', k_steps(j))
for _, s in ipairs(steps) do redis.call('PERSIST', k_step(j, s)) end
for _, k in ipairs({k_spec(j), k_state(j), k_inputs(j), k_steps(j), k_finished(j), k_failed(j)}) do
  redis.call('PERSIST', k)
end
redis.call('HDEL', k_state(j), 'error', 'ended_at', 'done_at', 'failed_at', 'cancelled_at', 'failed_step')
redis.call('HSET', k_state(j), 'status', ARGV[7], ARGV[7] .. '_at', t)
redis.call('SADD', k_active(), j)
redis.call('ZREM', k_ended(), j)
redis.call('HSET', k_state(j), 'submitted_at', t)
redis.call('HDEL', k_state(j), 'first_running_at')
add_step(j, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], t)
return 1
"""

#: A worker's main process received a step's message. ARGV: job, step, worker. The time the step
#: was queued raises its queue's received mark (what the reconciler finds lost messages behind).
RECEIVED = _PRELUDE + """
local j, s = ARGV[1], ARGV[2]
local sk = k_step(j, s)
if redis.call('HGET', sk, 'state') ~= 'queued' or final(job_status(j)) then return 0 end
local m, queue = member(j, s), redis.call('HGET', sk, 'queue')
local queued = redis.call('ZSCORE', k_pending(queue), m)
if queued and tonumber(queued) > tonumber(redis.call('GET', k_received(queue)) or '0') then
  redis.call('SET', k_received(queue), queued)
end
redis.call('ZREM', k_pending(queue), m)
redis.call('ZADD', k_held(), now(), m)
redis.call('HSET', sk, 'holder', ARGV[3])
return 1
"""

#: The reconciler's one repair: put a step whose message is lost back on its queue, once.
#: ARGV: member, kind (lease | held | orphan | lost), reason, new message id, old message id (orphan,
#: lost), held for at least this many seconds (orphan: its message is in no worker's hands).
#: -> {task, queue} when this call claimed the repair, else {}.
REPAIR = _PRELUDE + """
local sep = string.find(ARGV[1], '|', 1, true)
local j, s = string.sub(ARGV[1], 1, sep - 1), string.sub(ARGV[1], sep + 1)
local m, t, kind = ARGV[1], now(), ARGV[2]
local sk = k_step(j, s)
local state, queue = redis.call('HGET', sk, 'state'), redis.call('HGET', sk, 'queue')
local js = job_status(j)
if not js or final(js) or not state then
  redis.call('ZREM', k_leases(), m)
  redis.call('ZREM', k_held(), m)
  return {}
end
if kind == 'lease' then
  local deadline = redis.call('ZSCORE', k_leases(), m)
  if state ~= 'running' or not deadline or tonumber(deadline) > t then return {} end
  redis.call('ZREM', k_leases(), m)
elseif kind == 'held' then
  if state ~= 'queued' or not redis.call('ZSCORE', k_held(), m) then return {} end
  local beat = redis.call('ZSCORE', k_workers(queue), redis.call('HGET', sk, 'holder') or '')
  if beat and tonumber(beat) > t then return {} end
  redis.call('ZREM', k_held(), m)
elseif kind == 'orphan' then
  local since = redis.call('ZSCORE', k_held(), m)
  local young = not since or tonumber(since) > t - tonumber(ARGV[6])
  if state ~= 'queued' or young or redis.call('HGET', sk, 'msg') ~= ARGV[5] then return {} end
  redis.call('ZREM', k_held(), m)
else
  if state ~= 'queued' or redis.call('HGET', sk, 'msg') ~= ARGV[5] or not redis.call('ZSCORE', k_pending(queue), m) then
    return {}
  end
end
redis.call('HSET', sk, 'state', 'queued', 'msg', ARGV[4], 'error', ARGV[3], 'token', '', 'holder', '',
           'queued_at', t, 'repaired', ARGV[3])
redis.call('HINCRBY', sk, 'repairs', 1)
redis.call('ZADD', k_pending(queue), t, m)
return {redis.call('HGET', sk, 'task'), queue}
"""

#: ARGV: limit. -> members whose lease deadline has passed.
LAPSED = _PRELUDE + """
return redis.call('ZRANGEBYSCORE', k_leases(), '-inf', now(), 'LIMIT', 0, tonumber(ARGV[1]))
"""

#: ARGV: queue, margin_s, limit. -> steps waiting on ``queue`` that were queued more than margin_s
#: before a step whose message a worker has already taken: on a first-in, first-out queue their
#: messages are gone. The cost is the number found, whatever the queue's length.
OVERTAKEN = _PRELUDE + """
local mark = tonumber(redis.call('GET', k_received(ARGV[1])) or '0')
-- %.17g: Lua's own number-to-text keeps 14 digits, too few for a time to the microsecond
return redis.call('ZRANGEBYSCORE', k_pending(ARGV[1]), '-inf', string.format('(%.17g', mark - tonumber(ARGV[2])),
                  'LIMIT', 0, tonumber(ARGV[3]))
"""

#: ARGV: age_s, limit. -> steps held (their message received by a worker) for longer than age_s.
OLD_HELD = _PRELUDE + """
return redis.call('ZRANGEBYSCORE', k_held(), '-inf', now() - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
"""

#: ARGV: queue, age_s, limit. -> {count, members...} of steps queued longer than age_s ago.
OLD_PENDING = _PRELUDE + """
local cutoff = now() - tonumber(ARGV[2])
local n = redis.call('ZCOUNT', k_pending(ARGV[1]), '-inf', cutoff)
local out = {tostring(n)}
if tonumber(ARGV[3]) > 0 then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', k_pending(ARGV[1]), '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[3]))) do
    out[#out + 1] = m
  end
end
return out
"""

#: ARGV: worker, ttl_s, window share, queues... Heartbeat of a worker for each queue it consumes;
#: each queue's window becomes the sum of its live workers' shares (at least 1).
HEARTBEAT = _PRELUDE + """
local t = now()
for i = 4, #ARGV do
  local q = ARGV[i]
  redis.call('ZADD', k_workers(q), t + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', k_window_shares(q), ARGV[1], ARGV[3])
  -- every restart is a new member: drop the dead ones an hour on, so the set stays small
  local dead = redis.call('ZRANGEBYSCORE', k_workers(q), '-inf', t - 3600, 'LIMIT', 0, 100)
  if #dead > 0 then
    redis.call('HDEL', k_window_shares(q), unpack(dead))
    redis.call('ZREM', k_workers(q), unpack(dead))
  end
  local window = 0
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', k_workers(q), '(' .. t, '+inf')) do
    window = window + tonumber(redis.call('HGET', k_window_shares(q), w) or '1')
  end
  redis.call('SET', k_window(q), math.max(window, 1))
end
return 1
"""

#: ARGV: queue. -> live workers consuming it.
LIVE_WORKERS = _PRELUDE + """
return redis.call('ZCOUNT', k_workers(ARGV[1]), '(' .. now(), '+inf')
"""

#: A step task ended done after ARGV[2] seconds: one observation of the ``convoy_step_seconds``
#: histogram. ARGV: task, seconds, bucket bounds (ascending; +Inf is implied).
OBSERVE_STEP = _PRELUDE + """
local task, v = ARGV[1], tonumber(ARGV[2])
local h = k_step_seconds()
for i = 3, #ARGV do
  if v <= tonumber(ARGV[i]) then redis.call('HINCRBY', h, task .. '|' .. ARGV[i], 1) end
end
redis.call('HINCRBY', h, task .. '|+Inf', 1)
redis.call('HINCRBY', h, task .. '|count', 1)
redis.call('HINCRBYFLOAT', h, task .. '|sum', v)
return 1
"""

#: ARGV: rate_ttl_s. -> the rates of holders heard from within rate_ttl_s, as HGETALL pairs.
RATES = _PRELUDE + """
prune_rates(now() - tonumber(ARGV[1]))
return redis.call('HGETALL', k_rates())
"""

#: ARGV: holder token. A step's holder stopped: its rate no longer counts.
FORGET_RATE = _PRELUDE + """
redis.call('HDEL', k_rates(), ARGV[1])
redis.call('ZREM', k_rates_seen(), ARGV[1])
return 1
"""

#: KEYS[1]: the owner key of an output directory. ARGV: job. -> '' if taken, else the owner.
CLAIM_OUT = _PRELUDE + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  local s = job_status(cur)
  if s and not final(s) then return cur end
end
redis.call('SET', KEYS[1], ARGV[1])
return ''
"""

#: -> how many expired jobs left the index.
PRUNE = _PRELUDE + """
local gone = redis.call('ZRANGEBYSCORE', k_ended(), '-inf', now(), 'LIMIT', 0, 100)
for _, j in ipairs(gone) do
  redis.call('ZREM', k_index(), j)
  redis.call('ZREM', k_ended(), j)
end
return #gone
"""
