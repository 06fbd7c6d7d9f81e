"""The Lua scripts of the shared broker: each touches one stream's keys atomically (one hash slot)."""

# KEYS: lease, stream. ARGV: holder, maxlen, refuse_gap, ttl_ms, channel, notice, then per entry its id, its
# field count and its fields. The stream's TTL is set on every append (a stream abandoned mid-run expires on its
# own), and `notice` is published on `channel` when something was appended: tailers read when told, so no
# replica holds a blocking read (a connection) per stream.
# One call appends a whole batch, so a burst from the upstream reaches the tailers as one
# read. An entry at or below the stream's last id is already there (a batch resent after its reply was
# lost, or history a new holder restores): it is skipped, so appending is idempotent. With refuse_gap
# set, a batch that would leave a hole after the stream's last entry (Redis lost acknowledged entries)
# is refused with `BEHIND <last ordinal>`, so the holder can put back what it has first.
FENCED_XADD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
if ARGV[3] == '1' and ARGV[7] then
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local last = 0
  if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
  local ordinal, seq = string.match(ARGV[7], '^(%d+)-(%d+)$')
  local needs = tonumber(ordinal) - 1
  if seq == '1' then needs = needs + 1 end
  if needs > last then return redis.error_reply('BEHIND ' .. last) end
end
local i = 7
local count = 0
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], ARGV[i], unpack(ARGV, i + 2, i + n + 1))
  if type(added) == 'table' and added.err then
    if not string.find(added.err, 'equal or smaller', 1, true) then return added end
  else
    count = count + 1
  end
  i = i + n + 2
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if count > 0 and ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return count
"""
# KEYS: lease, stream, fence. ARGV: holder, lease ttl_ms, keep ttl_ms. The holder keeps its stream and
# fence counter alive with its lease; when nobody holds the lease they expire `keep` later.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease, fence. ARGV: holder prefix, nonce, lease ttl_ms, keep ttl_ms. Returns the new holder value
# ("<prefix>:<fence>:<nonce>") or false when another replica holds the lease.
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local holder = ARGV[1] .. ':' .. fence .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], holder, 'PX', ARGV[3])
return holder
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
