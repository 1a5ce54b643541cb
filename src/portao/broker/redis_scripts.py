"""The Lua scripts of the Redis backend: each broker operation is one atomic script.

A script runs where the data is, so a check and its write (the queue bound and the
XADD, an ownership check and the XACK) cannot interleave with another client, and an
operation over many routes or bindings costs one round trip. Scripts read the
server's clock (`TIME`), so expiries agree across hosts whatever their clocks say.

Scripts take every key they touch in KEYS except the bindings a gateway's index
names (heartbeat, send_to_user, unbinding a gateway): portao targets one Redis
server (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Script:
    """A named Lua source and the SHA1 that EVALSHA runs it by."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Raise a key's time to live to `ttl` (a fresh key has none): never shortens it.
_KEEP = """
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# True while `consumer` holds this very delivery of entry `id` (same delivery count).
# A missing group is an error from XPENDING: then nobody holds anything.
_HELD = """
local function held(stream, group, consumer, id, deliveries)
  local r = redis.pcall('XPENDING', stream, group, id, id, 1)
  if r.err or r[1] == nil then return false end
  return r[1][2] == consumer and r[1][4] == deliveries
end
"""

# Append payloads[first..] to a live gateway's inbox; the inbox expires together with
# the liveness key. Returns 1, or 0 for a dead gateway.
_DELIVER = """
local function deliver(alive, inbox, maxlen, payloads, first)
  local ttl = redis.call('PTTL', alive)
  if ttl == -2 then return 0 end
  for i = first, #payloads do
    redis.call('XADD', inbox, 'MAXLEN', '~', maxlen, '*', 'm', payloads[i])
  end
  if ttl > 0 then redis.call('PEXPIRE', inbox, ttl) end
  return 1
end
"""

# Call fn(zset key, member) for each `name NUL member` entry of an index set.
_EACH_ENTRY = """
local function each_entry(index, zset_prefix, fn)
  for _, entry in ipairs(redis.call('SMEMBERS', index)) do
    local cut = string.find(entry, '\\0', 1, true)
    fn(zset_prefix .. string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1))
  end
end
"""

#: KEYS routes, queue, backlog; ARGV route, max_len, check_registry, then one payload
#: per share (a batched script: `RedisLink.submit_share`). Queues the payloads in
#: order while the backlog is under max_len. Returns, per share, 1 (queued), 0 (an
#: unknown route) or -1 (a full queue).
PUBLISH = Script(
    "publish",
    """
local out = {}
if ARGV[3] == '1' and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  for i = 4, #ARGV do out[#out + 1] = 0 end
  return out
end
local room = tonumber(ARGV[2]) - tonumber(redis.call('GET', KEYS[3]) or '0')
local added = 0
for i = 4, #ARGV do
  if added < room then
    redis.call('XADD', KEYS[2], '*', 'e', ARGV[i])
    added = added + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = -1
  end
end
if added > 0 then redis.call('INCRBY', KEYS[3], added) end
return out
""",
)

#: KEYS routes, then queue, backlog per route; ARGV group, then the routes.
#: Registers the routes and creates missing groups, reading from the start of the
#: stream (entries queued while the group was gone are delivered); a new group's
#: backlog is the whole stream. Returns how many groups were created.
REGISTER = Script(
    "register",
    """
local created = 0
for i = 2, #ARGV do
  local queue, backlog = KEYS[2 * i - 2], KEYS[2 * i - 1]
  redis.call('SADD', KEYS[1], ARGV[i])
  local r = redis.pcall('XGROUP', 'CREATE', queue, ARGV[1], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'BUSYGROUP', 1, true) then return redis.error_reply(r.err) end
  else
    redis.call('SET', backlog, redis.call('XLEN', queue))
    created = created + 1
  end
end
return created
""",
)

#: KEYS queues; ARGV group, consumer, max_count, min_idle_ms (0: no reclaim), then
#: an XAUTOCLAIM cursor per queue. Reclaims entries idle past min_idle_ms, then reads
#: new ones, up to max_count. Returns {flat (key index, id, payload, deliveries)...,
#: key indexes with no group, next cursor per queue}. The cursors walk the whole
#: pending list over successive calls: an expired entry behind many live claims is
#: found too.
FETCH = Script(
    "fetch",
    """
local group, consumer = ARGV[1], ARGV[2]
local left = tonumber(ARGV[3])
local min_idle = tonumber(ARGV[4])
local out, missing, broken, cursors = {}, {}, {}, {}
local function add(i, entry, deliveries)
  local payload = ''
  for j = 1, #entry[2], 2 do
    if entry[2][j] == 'e' then payload = entry[2][j + 1] end
  end
  out[#out + 1] = i
  out[#out + 1] = entry[1]
  out[#out + 1] = payload
  out[#out + 1] = deliveries
  left = left - 1
end
for i = 1, #KEYS do
  cursors[i] = ARGV[4 + i]
  if min_idle > 0 and left > 0 then
    local r = redis.pcall('XAUTOCLAIM', KEYS[i], group, consumer, min_idle, cursors[i],
                          'COUNT', left)
    if r.err then
      broken[i] = true
      missing[#missing + 1] = i
    else
      cursors[i] = r[1]
      for _, entry in ipairs(r[2]) do
        local p = redis.call('XPENDING', KEYS[i], group, entry[1], entry[1], 1)
        add(i, entry, p[1][4])
      end
    end
  end
end
for i = 1, #KEYS do
  if left <= 0 then break end
  if not broken[i] then
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left,
                          'STREAMS', KEYS[i], '>')
    if type(r) == 'table' and r.err then
      missing[#missing + 1] = i
    elseif r then
      for _, entry in ipairs(r[1][2]) do add(i, entry, 1) end
    end
  end
end
return {out, missing, cursors}
""",
)

#: KEYS queue; ARGV group, consumer, idle_ms, ids. Hands entries a blocking read
#: brought beyond max_count back: they look expired, with no delivery counted, so
#: the next reclaim (by any consumer) takes them.
RELEASE = Script(
    "release",
    """
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
for _, word in ipairs({'IDLE', ARGV[3], 'RETRYCOUNT', 0, 'JUSTID'}) do
  args[#args + 1] = word
end
return redis.call(unpack(args))
""",
)

#: KEYS queues; ARGV group, consumer, then (key index, id, deliveries) per delivery.
#: Resets the idle time of the entries still held; returns 1 (kept) or 0 (lost) each.
EXTEND = Script(
    "extend",
    _HELD
    + """
local out = {}
for pos = 3, #ARGV, 3 do
  local queue, id = KEYS[tonumber(ARGV[pos])], ARGV[pos + 1]
  if held(queue, ARGV[1], ARGV[2], id, tonumber(ARGV[pos + 2])) then
    redis.call('XCLAIM', queue, ARGV[1], ARGV[2], 0, id, 'JUSTID')
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""",
)

#: KEYS queue, backlog per route; ARGV group, consumer, then (route index, id,
#: deliveries) per delivery. Acks only what the consumer still holds (same delivery
#: count); returns the count. Per route, one XPENDING over the batch's id range
#: tells what is held (an entry it missed, if it was cut short, is asked for alone),
#: one XACK acks it and one DECRBY lowers the backlog by what XACK counted.
ACK = Script(
    "ack",
    _HELD
    + """
local group, consumer = ARGV[1], ARGV[2]
local function split(id)
  local cut = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, cut - 1)), tonumber(string.sub(id, cut + 1))
end
local function less(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  return am < bm or (am == bm and as < bs)
end
local batches, order = {}, {}
for pos = 3, #ARGV, 3 do
  local i, id = tonumber(ARGV[pos]), ARGV[pos + 1]
  local b = batches[i]
  if b == nil then
    b = {ids = {}, want = {}, lo = id, hi = id}
    batches[i] = b
    order[#order + 1] = i
  end
  b.ids[#b.ids + 1] = id
  b.want[id] = tonumber(ARGV[pos + 2])
  if less(id, b.lo) then b.lo = id end
  if less(b.hi, id) then b.hi = id end
end
local total = 0
for _, i in ipairs(order) do
  local b, queue = batches[i], KEYS[2 * i - 1]
  local limit = 2 * #b.ids + 100
  local pending = redis.pcall('XPENDING', queue, group, b.lo, b.hi, limit, consumer)
  if not pending.err then
    local found = {}
    for _, entry in ipairs(pending) do found[entry[1]] = entry[4] end
    local acks = {}
    for _, id in ipairs(b.ids) do
      local deliveries = found[id]
      if deliveries == nil and #pending == limit then
        if held(queue, group, consumer, id, b.want[id]) then deliveries = b.want[id] end
      end
      if deliveries == b.want[id] then acks[#acks + 1] = id end
    end
    local acked = 0
    for from = 1, #acks, 1000 do
      local chunk = {}
      for k = from, math.min(from + 999, #acks) do chunk[#chunk + 1] = acks[k] end
      acked = acked + redis.call('XACK', queue, group, unpack(chunk))
    end
    if acked > 0 then redis.call('DECRBY', KEYS[2 * i], acked) end
    total = total + acked
  end
end
return total
""",
)

#: KEYS queue, backlog, dead letters; ARGV group, consumer, id, deliveries, payload,
#: error, max_len. Moves a held entry to the dead letters; returns 1, or 0 if not held.
DEAD_LETTER = Script(
    "dead_letter",
    _HELD
    + """
if not held(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('DECRBY', KEYS[2], 1)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[7], '*', 'e', ARGV[5], 'error', ARGV[6])
return 1
""",
)

#: KEYS queue; ARGV stale_consumer_ms. Trims the stream below the oldest entry some
#: group has not acknowledged (XTRIM MINID: never an unfinished entry), and drops
#: consumers that hold nothing and were idle past stale_consumer_ms. No group: no trim.
TRIM = Script(
    "trim",
    """
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local function split(id)
  local cut = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, cut - 1)), tonumber(string.sub(id, cut + 1))
end
local min_ms, min_seq
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = fields(flat)
  local ms, seq
  if g['pending'] > 0 then
    ms, seq = split(redis.call('XPENDING', KEYS[1], g['name'])[2])
  else
    ms, seq = split(g['last-delivered-id'])
    seq = seq + 1
  end
  if min_ms == nil or ms < min_ms or (ms == min_ms and seq < min_seq) then
    min_ms, min_seq = ms, seq
  end
  for _, cflat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], g['name'])) do
    local c = fields(cflat)
    if c['pending'] == 0 and c['idle'] > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], g['name'], c['name'])
    end
  end
end
if min_ms == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', min_ms, min_seq))
""",
)

#: KEYS alive, inbox; ARGV inbox max_len, then one payload per share (batched).
#: Returns, per share, 1, or 0 for a dead gateway (whose inbox is not written).
SEND = Script(
    "send",
    _DELIVER
    + """
local sent = deliver(KEYS[1], KEYS[2], ARGV[1], ARGV, 2)
local out = {}
for i = 2, #ARGV do out[#out + 1] = sent end
return out
""",
)

#: KEYS user; ARGV payload, inbox max_len, alive prefix, inbox prefix. Writes to the
#: inbox of every live gateway bound to the user; drops expired bindings. Returns
#: how many inboxes got it.
SEND_TO_USER = Script(
    "send_to_user",
    _NOW
    + _DELIVER
    + """
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local sent = 0
for _, gw in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  sent = sent + deliver(ARGV[3] .. gw, ARGV[4] .. gw, ARGV[2], {ARGV[1]}, 1)
end
return sent
""",
)

#: KEYS alive, inbox, user index, member index; ARGV ttl_ms, user prefix, members
#: prefix. Keeps the gateway, its inbox and every binding it indexes alive for ttl.
#: Returns 1 if the gateway was alive, 0 if its liveness had lapsed (or never was).
HEARTBEAT = Script(
    "heartbeat",
    _NOW
    + _KEEP
    + _EACH_ENTRY
    + """
local ttl = tonumber(ARGV[1])
local was_alive = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local expiry = now_ms() + ttl
local function refresh(zset, member)
  redis.call('ZADD', zset, expiry, member)
  keep(zset, ttl)
end
each_entry(KEYS[3], ARGV[2], refresh)
each_entry(KEYS[4], ARGV[3], refresh)
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
return was_alive
""",
)

#: KEYS alive, zset, index; ARGV member, index entry. Adds a binding (a gateway to a
#: user, a member to a room) that lives as long as the gateway; returns 0 if it is dead.
BIND = Script(
    "bind",
    _NOW
    + _KEEP
    + """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then return 0 end
redis.call('ZADD', KEYS[2], now_ms() + ttl, ARGV[1])
keep(KEYS[2], ttl)
redis.call('SADD', KEYS[3], ARGV[2])
keep(KEYS[3], ttl)
return 1
""",
)

#: KEYS zset, index; ARGV member, index entry. Undoes BIND.
UNBIND = Script(
    "unbind",
    """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
""",
)

#: KEYS index, then keys to delete; ARGV zset prefix. Removes every binding the index
#: names, then deletes the index and the other keys.
DROP_INDEX = Script(
    "drop_index",
    _EACH_ENTRY
    + """
each_entry(KEYS[1], ARGV[1], function(zset, member) redis.call('ZREM', zset, member) end)
return redis.call('DEL', unpack(KEYS))
""",
)

#: KEYS members. Drops expired members; returns the live ones.
ROOM_MEMBERS = Script(
    "room_members",
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
return redis.call('ZRANGE', KEYS[1], 0, -1)
""",
)

ALL: tuple[Script, ...] = (
    PUBLISH,
    REGISTER,
    FETCH,
    RELEASE,
    EXTEND,
    ACK,
    DEAD_LETTER,
    TRIM,
    SEND,
    SEND_TO_USER,
    HEARTBEAT,
    BIND,
    UNBIND,
    DROP_INDEX,
    ROOM_MEMBERS,
)
