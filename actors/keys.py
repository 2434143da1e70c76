"""The one module that owns the Redis key schema and the Lua scripts.

Nothing else in the code base spells a key or channel name: everything goes through `Keys`, and
every script is called through a `do_*` method of `Scripts` (registered once; redis-py's
`AsyncScript` calls EVALSHA and reloads the script on NOSCRIPT by itself).

Lease (directory entry) of a session: hash `lease(sid)` with `o` = owner incarnation ("" once
released) and `e` = epoch (+1 on every claim, never reset while the key lives; the key's TTL
follows the checkpoint's so the epoch outlives every checkpoint written under it).
Scripts that must reach another instance's keys (the owner's liveness key or inbox) build the
name inside Lua from the prefix with the same spelling as `Keys.liveness` / `Keys.inbox`.
"""

from __future__ import annotations

import functools
import zlib
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot
from redis.exceptions import MovedError, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.connection import connection_kwargs, is_cluster

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import redis.asyncio

# Checkpoints (and leases) live at least as long as the longest allowed session (48 h), refreshed
# on every write; a few days of slack so an idle-but-open session survives a weekend.
CHECKPOINT_TTL_MS = 4 * 24 * 3600 * 1000
# A forwarded command nobody pops (owner died) must not pile up forever.
INBOX_TTL_MS = 60_000
# Entries kept in an incarnation's popped list (Keys.inbox_popped), newest first: at least one
# batch read (the inbox loop reads up to 128), so a read whose reply was lost can be read again.
POPPED_KEEP = 256

# Consumer groups on every outbox stream (`Keys.outbox_of`): each group sees every entry once.
AUDIT_GROUP = "audit"  # copies events into PostgreSQL (actors/outbox/audit.py)
PUSH_GROUP = "push"  # turns events into FCM notifications (actors/outbox/push.py)


def partition_tags(partitions: int) -> tuple[str, ...]:
    """The hash tag of each partition: partition i's tag hashes into the i-th of `partitions`
    equal ranges of the 16,384 cluster slots, so a cluster whose masters own equal contiguous
    ranges (as `redis-cli --cluster create` makes it) gets an equal share of partitions."""
    return _partition_tags(partitions)


@functools.cache
def _partition_tags(partitions: int) -> tuple[str, ...]:
    tags = []
    for i in range(partitions):
        low, high = i * SLOTS // partitions, (i + 1) * SLOTS // partitions
        n = 0
        while not low <= key_slot(_tag(i, n).encode()) < high:
            n += 1
        tags.append(_tag(i, n))
    return tuple(tags)


def _tag(i: int, n: int) -> str:
    return f"p{i}" if n == 0 else f"p{i}.{n}"


class Keys:
    """Key and channel names under one deployment prefix (`KAIROS_KEY_PREFIX`), for `partitions`
    partitions (`KAIROS_REDIS_PARTITIONS`).

    Every key carries a hash tag so that whatever one script touches lives in one cluster slot:
    a session's keys and its partition's outbox stream and deadline index share the partition's
    tag (`{p3}`), an instance's liveness key, inbox and popped list share its incarnation
    (`{<incarnation>}`). Channels are not keys (PUBLISH reaches every node)."""

    def __init__(self, prefix: str = "kairos:", partitions: int = 1) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain { or } (they mark hash tags)")
        self.prefix = prefix
        self.partitions = partitions
        self.tags = partition_tags(partitions)

    def partition(self, session_id: str) -> int:
        """The session's partition: crc32 of its id modulo the partition count."""
        return 0 if self.partitions == 1 else zlib.crc32(session_id.encode()) % self.partitions

    def session_prefix(self, partition: int) -> str:
        """What every key of a session of `partition` starts with (Lua appends sid .. ':lease')."""
        return f"{self.prefix}s:{{{self.tags[partition]}}}:"

    def checkpoint(self, session_id: str) -> str:
        """String: the session's checkpoint bytes (`kairos.encode`)."""
        return f"{self.session_prefix(self.partition(session_id))}{session_id}:cp"

    def lease(self, session_id: str) -> str:
        """Hash {o: owner incarnation or "", e: epoch, v: version last written under it (absent
        when unknown), d: "1" once deleted (tombstone)}."""
        return f"{self.session_prefix(self.partition(session_id))}{session_id}:lease"

    def channel(self, session_id: str) -> str:
        """Pub/sub channel carrying the session's update messages (`kairos.wire.update_message`)."""
        return f"{self.prefix}s:{session_id}:ch"

    def liveness(self, incarnation: str) -> str:
        """String with TTL: the instance's info (JSON) while the incarnation is alive.

        Spelled again inside Lua as PREFIX .. 'i:{' .. inc .. '}:alive'."""
        return f"{self.prefix}i:{{{incarnation}}}:alive"

    def inbox(self, incarnation: str) -> str:
        """List of forwarded commands for the incarnation. Lua: PREFIX .. 'i:{' .. inc .. '}:inbox'."""
        return f"{self.prefix}i:{{{incarnation}}}:inbox"

    def inbox_popped(self, incarnation: str) -> str:
        """List, newest first: entries the incarnation's inbox reads took (the last POPPED_KEEP),
        so an entry whose read reply was lost is read again, not lost. Lua: ... .. '}:popped'."""
        return f"{self.prefix}i:{{{incarnation}}}:popped"

    def reply_channel(self, incarnation: str) -> str:
        """Pub/sub channel on which owners answer forwarded commands."""
        return f"{self.prefix}i:{incarnation}:replies"

    @property
    def instances(self) -> str:
        """Set of incarnations that joined (dead ones are pruned when the list is read)."""
        return f"{self.prefix}instances"

    @property
    def layout(self) -> str:
        """String: the partition count the keys were laid out for (checked at start)."""
        return f"{self.prefix}layout"

    def deadlines_of(self, partition: int) -> str:
        """Sorted set: the partition's running sessions (session_id) scored by next deadline."""
        return f"{self.prefix}{{{self.tags[partition]}}}:deadlines"

    def outbox_of(self, partition: int) -> str:
        """The partition's outbox stream: one entry per accepted change of its sessions, field
        `m` = update message bytes."""
        return f"{self.prefix}{{{self.tags[partition]}}}:outbox"

    @property
    def outboxes(self) -> list[str]:
        """Every partition's outbox stream."""
        return [self.outbox_of(p) for p in range(self.partitions)]

    @property
    def deadlines(self) -> str:
        """The deadline index of a one-partition layout."""
        assert self.partitions == 1, "several partitions: use deadlines_of(partition)"
        return self.deadlines_of(0)

    @property
    def outbox(self) -> str:
        """The outbox stream of a one-partition layout."""
        assert self.partitions == 1, "several partitions: use outbox_of(partition) / outboxes"
        return self.outbox_of(0)

    def devices(self, sub: str) -> str:
        return f"{self.prefix}devices:{sub}"

    def requests(self, caller: str, window: int) -> str:
        """String with TTL: requests of `caller` in fixed window number `window` (the general rate
        limit, counted for all instances together)."""
        return f"{self.prefix}rl:{window}:{caller}"


# --- join --------------------------------------------------------------------------------------
# KEYS[1] my liveness key, KEYS[2] instances set
# ARGV[1] my incarnation, ARGV[2] info JSON, ARGV[3] liveness TTL ms
# Returns 1 (joined) or 0 (incarnation already taken, never happens with random ids).
JOIN = """
if redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# --- list live instances -----------------------------------------------------------------------
# KEYS[1] instances set
# ARGV[1] key prefix
# Returns the info JSON of every live incarnation; dead ones are removed from the set (and their
# popped list, Keys.inbox_popped, which may have no TTL).
LIST_INSTANCES = """
local out = {}
for _, inc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. 'i:{' .. inc .. '}:alive')
  if info then
    out[#out + 1] = info
  else
    redis.call('SREM', KEYS[1], inc)
    redis.call('DEL', ARGV[1] .. 'i:{' .. inc .. '}:popped')
  end
end
return out
"""

# The lease rules both claim scripts share (CLAIM_OR_FORWARD on one Redis, CLAIM on a cluster):
# who holds the lease of KEYS[1], and whether `me` may take it. The script defines `me` (my
# incarnation), `may` ("1"/"0") and `other_owner(owner)`: its answer for another instance named
# by the lease, or nil when that instance is dead (the lease is taken over). Answers {5} (mine,
# may not claim) or {4} (free, may not claim) itself; otherwise leaves `epoch` (the next one)
# and `reason` (new|released|takeover|self).
_LEASE_RULES = """
local lease = redis.call('HMGET', KEYS[1], 'o', 'e')
local owner = lease[1]
local epoch = tonumber(lease[2] or '0')
local reason = 'new'
if owner == me then
  if may ~= '1' then return {5} end
  reason = 'self'
elseif owner == '' then
  reason = 'released'
elseif owner then
  local answer = other_owner(owner)
  if answer then return answer end
  reason = 'takeover'
end
if may ~= '1' then return {4} end
epoch = epoch + 1
"""

# --- claim or forward (activation and routing in one round trip) -------------------------------
# KEYS[1] lease(sid), KEYS[2] my liveness key, KEYS[3] checkpoint(sid)
# ARGV[1] my incarnation, ARGV[2] key prefix, ARGV[3] may_claim "1"/"0",
# ARGV[4] forward payload ("" = do not forward), ARGV[5] inbox TTL ms, ARGV[6] lease TTL ms,
# ARGV[7] claim on behalf of this live incarnation instead ("" = me; a draining instance hands
#         a free session straight to its successor and forwards the payload there: reply {2, it}),
# ARGV[8] how many entries the receiver's popped list keeps (POPPED_KEEP; trimmed here, as the
#         receiver's single-command reads cannot)
# Returns
#   {1, epoch, checkpoint|nil, reason}  claimed (reason new|released|takeover|self), epoch + 1
#   {2, owner, pttl}  a live other instance owns it; payload RPUSHed onto its inbox; pttl = ms
#                     its liveness key has left (when to look again if it never answers)
#   {3, owner, pttl}  a live other instance owns it; nothing forwarded (empty payload)
#   {4}          nobody owns it and may_claim is "0"
#   {5}          the lease names me and may_claim is "0"
#   {-1}         my own liveness key is gone: I must not claim anything
CLAIM_OR_FORWARD = """
local me, may = ARGV[1], ARGV[3]
local function forward(inc)
  local inbox, popped = ARGV[2] .. 'i:{' .. inc .. '}:inbox', ARGV[2] .. 'i:{' .. inc .. '}:popped'
  redis.call('RPUSH', inbox, ARGV[4])
  redis.call('PEXPIRE', inbox, ARGV[5])
  redis.call('LTRIM', popped, 0, tonumber(ARGV[8]) - 1)
  redis.call('PEXPIRE', popped, ARGV[5])
end
local function other_owner(owner)
  local pttl = redis.call('PTTL', ARGV[2] .. 'i:{' .. owner .. '}:alive')
  if pttl < 0 then return nil end
  if ARGV[4] == '' then return {3, owner, pttl} end
  forward(owner)
  return {2, owner, pttl}
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
""" + _LEASE_RULES + """
if ARGV[7] ~= '' and ARGV[7] ~= ARGV[1] then
  local pttl = redis.call('PTTL', ARGV[2] .. 'i:{' .. ARGV[7] .. '}:alive')
  if pttl < 0 then return {4} end
  redis.call('HSET', KEYS[1], 'o', ARGV[7], 'e', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  if ARGV[4] ~= '' then forward(ARGV[7]) end
  return {2, ARGV[7], pttl}
end
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'e', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, epoch, redis.call('GET', KEYS[3]), reason}
"""

# --- fenced write (the hot path: one round trip per accepted command) ---------------------------
# KEYS[1] lease(sid), KEYS[2] checkpoint(sid), KEYS[3] the partition's outbox stream, KEYS[4] its
# deadlines zset (all four in the partition's slot), KEYS[5] my liveness key (one Redis only: on a
# cluster it lives in another slot and is not checked; the lease alone fences, docs/scaling.md)
# ARGV[1] my incarnation, ARGV[2] my epoch, ARGV[3] checkpoint bytes, ARGV[4] TTL ms,
# ARGV[5] update message bytes ("" = checkpoint only, e.g. a restored session), ARGV[6] channel
# ("" = append to the outbox but do not publish: the caller publishes once replicas confirmed),
# ARGV[7] session id, ARGV[8] next deadline ms ("" = none: not running),
# ARGV[9] reply channel, ARGV[10] answer bytes ("" = none) for a forwarded command's asker,
# ARGV[11] the checkpoint's version ("" = unknown: written without the version check)
# Safe to send twice (a client retry after a lost reply): version v is written only over v - 1
# (lease field `v`); a repeat of v is answered ALREADY_WRITTEN without a second XADD/PUBLISH.
# Returns 1 written, 2 already written (this very write, repeated), 0 lease no longer mine or
# version not next (fenced), -1 my liveness key is gone.
FENCED_WRITE = """
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
local lease = redis.call('HMGET', KEYS[1], 'o', 'e', 'v')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
if ARGV[11] ~= '' and lease[3] then
  local written, v = tonumber(lease[3]), tonumber(ARGV[11])
  if written == v then return 2 end
  if written ~= v - 1 then return 0 end
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if ARGV[11] ~= '' then
  redis.call('HDEL', KEYS[1], 'd')  -- re-created after a delete: no longer a tombstone
  redis.call('HSET', KEYS[1], 'v', ARGV[11])
else
  redis.call('HDEL', KEYS[1], 'd', 'v')
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[5])
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[5]) end
end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7])
else
  redis.call('ZREM', KEYS[4], ARGV[7])
end
if ARGV[10] ~= '' then
  redis.call('PUBLISH', ARGV[9], ARGV[10])
end
return 1
"""
ALREADY_WRITTEN = 2  # FENCED_WRITE / FENCED_DELETE: a repeat of a write that already happened

# --- fenced delete ------------------------------------------------------------------------------
# KEYS as FENCED_WRITE.
# ARGV[1] my incarnation, ARGV[2] my epoch, ARGV[3] update message bytes (session_deleted),
# ARGV[4] channel ("" = do not publish), ARGV[5] session id
# Deletes the checkpoint, releases the lease (keeping its epoch) with a tombstone field `d` so an
# audit snapshot taken before the deletion was audited cannot resurrect it, appends + publishes
# the message, drops the deadline. Safe to send twice: the repeat finds the tombstone under my
# epoch and answers 2. Returns 1 / 2 already deleted / 0 fenced / -1 liveness gone.
FENCED_DELETE = """
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
local lease = redis.call('HMGET', KEYS[1], 'o', 'e', 'd')
if lease[1] == '' and lease[2] == ARGV[2] and lease[3] == '1' then return 2 end
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'o', '', 'd', '1')
redis.call('HDEL', KEYS[1], 'v')
redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[3]) end
redis.call('ZREM', KEYS[4], ARGV[5])
return 1
"""

# --- release ------------------------------------------------------------------------------------
# KEYS[1] lease(sid)
# ARGV[1] my incarnation, ARGV[2] my epoch
# Marks the lease released (owner "", epoch kept) if it is still mine. Returns 1 or 0.
RELEASE = """
local lease = redis.call('HMGET', KEYS[1], 'o', 'e')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'o', '')
return 1
"""


# Incarnations remembered as dead (Scripts.dead) at most; beyond, the memory starts again.
_MAX_DEAD = 10_000
# Connection options the inbox reader's own cluster client copies from the main one.
_READER_OPTIONS = ("username", "password", "socket_timeout", "socket_connect_timeout", "client_name")

# Pool connections left for the long-lived readers (reply pub/sub, renewal, spare; the inbox reads
# have a client of their own).
_RESERVED_CONNECTIONS = 4


# --- adopt orphans (the sweeper, on one Redis) -----------------------------------------------------
# KEYS[1] the partition's deadlines zset, KEYS[2] my liveness key
# ARGV[1] my incarnation, ARGV[2] key prefix, ARGV[3] max deadline ms (now + horizon),
# ARGV[4] how many due entries to look at, ARGV[5] how many to adopt at most, ARGV[6] lease TTL ms,
# ARGV[7] offset into the due entries (sweeps page through them when there are many)
# Looks at due deadlines; a session whose lease is released or whose owner's liveness key is
# gone is claimed for me (epoch + 1); entries without a checkpoint are dropped. Sessions whose
# lease names me are listed too: the caller re-activates those it has no actor for (one whose
# write failed while Redis was away), so their deadline still fires.
# ARGV[8] the partition's session key prefix (Keys.session_prefix): Lua spells Keys.lease /
# Keys.checkpoint as ARGV[8] .. sid .. ':lease' / ':cp'.
# Returns {checked, fetched, {my sid, ...}, sid1, epoch1, checkpoint1, reason1, sid2, ...} ({-1}
# if my liveness key is gone); reason as CLAIM_OR_FORWARD's (released: a clean stop or
# passivation let it go; takeover: its owner died); `checked` < `fetched` when the adoption
# batch filled up first.
# Shared by ADOPT_ORPHANS and ADOPT_DUE: claim one due session for me (ARGV[1]) with the lease
# `lease` = {owner, epoch} read from key `lk`, appending {sid, epoch, checkpoint, reason} to `out`;
# an entry whose checkpoint `ck` is gone is dropped from the deadlines (KEYS[1]) instead.
_ADOPT_ONE = """
local function adopt(out, sid, lk, ck, lease, ttl)
  local cp = redis.call('GET', ck)
  if not cp then
    redis.call('ZREM', KEYS[1], sid)
    return
  end
  local owner = lease[1]
  local epoch = tonumber(lease[2] or '0') + 1
  redis.call('HSET', lk, 'o', ARGV[1], 'e', epoch)
  redis.call('PEXPIRE', lk, ttl)
  out[#out + 1] = sid
  out[#out + 1] = epoch
  out[#out + 1] = cp
  if not owner then out[#out + 1] = 'new' elseif owner == '' then out[#out + 1] = 'released'
  else out[#out + 1] = 'takeover' end
end
"""
ADOPT_ORPHANS = _ADOPT_ONE + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', ARGV[7], ARGV[4])
local mine = {}
local out = {0, #due, mine}
local want = tonumber(ARGV[5])
for _, sid in ipairs(due) do
  out[1] = out[1] + 1
  local lk = ARGV[8] .. sid .. ':lease'
  local lease = redis.call('HMGET', lk, 'o', 'e')
  local owner = lease[1]
  if owner == ARGV[1] then
    mine[#mine + 1] = sid
  elseif not owner or owner == '' or
     (owner ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. 'i:{' .. owner .. '}:alive') == 0) then
    adopt(out, sid, lk, ARGV[8] .. sid .. ':cp', lease, ARGV[6])
    if #out >= want * 4 + 3 then break end
  end
end
return out
"""


# --- count a request (the general rate limit, shared by every instance) -------------------------
# KEYS[1] the caller's counter of this window (Keys.requests)
# ARGV[1] TTL ms (the window's length: the counter is gone long before anyone reads it again)
# Returns the number of requests counted in the window, this one included.
COUNT_REQUEST = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


# --- hand off (drain) -----------------------------------------------------------------------------
# KEYS[1] lease(sid), KEYS[2] target's inbox, KEYS[3] target's liveness key
# ARGV[1] my incarnation, ARGV[2] my epoch, ARGV[3] target incarnation, ARGV[4] activation message,
# ARGV[5] inbox TTL ms
# If the lease is still mine: give it to the target (epoch + 1) and ask it to activate the session
# now; commands routed meanwhile already go to the target. Returns 1 handed off, 2 released (the
# target is not alive), 0 not mine any more.
HAND_OFF = """
local lease = redis.call('HMGET', KEYS[1], 'o', 'e')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'o', '')
  return 2
end
redis.call('HSET', KEYS[1], 'o', ARGV[3], 'e', tonumber(lease[2]) + 1)
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""


# --- pop forwarded commands (the inbox loop, when several are queued) ----------------------------
# KEYS[1] my inbox, KEYS[2] my popped list (Keys.inbox_popped)
# ARGV[1] how many at most, ARGV[2] TTL ms, ARGV[3] POPPED_KEEP
# Moves up to ARGV[1] entries from the inbox onto the head of the popped list (as the lone read's
# BLMOVE does, newest first), keeps the popped list short, returns the entries (oldest first).
POP_INBOX = """
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then return {} end
redis.call('LPUSH', KEYS[2], unpack(items))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return items
"""


# --- scripts of a Redis Cluster ---------------------------------------------------------------------
# On a cluster a script may only touch keys of one slot. The scripts above that also reach an
# instance's keys (claim-or-forward, hand-off, adoption, join, list) are split into a step in the
# session's partition slot and a step in the instance's slot; docs/scaling.md argues why the
# split keeps one owner per session.

# --- claim (cluster: the session's slot) ----------------------------------------------------------
# KEYS[1] lease(sid), KEYS[2] checkpoint(sid)
# ARGV[1] my incarnation, ARGV[2] may_claim "1"/"0", ARGV[3] lease TTL ms,
# ARGV[4] claim on behalf of this incarnation instead ("" = me; a draining instance's successor),
# ARGV[5] an owner the caller found dead ("" = none): its lease may be taken over
# Returns {1, epoch, checkpoint|nil, reason} claimed for me, {7, incarnation, epoch} claimed for
# ARGV[4], {6, owner} another incarnation holds it (the caller asks its liveness key: FORWARD),
# {4} nobody owns it and may_claim is "0", {5} the lease names me and may_claim is "0".
CLAIM = """
local me, may = ARGV[1], ARGV[2]
local function other_owner(owner)
  if owner == ARGV[5] then return nil end
  return {6, owner}
end
""" + _LEASE_RULES + """
local new_owner = ARGV[1]
if ARGV[4] ~= '' then new_owner = ARGV[4] end
redis.call('HSET', KEYS[1], 'o', new_owner, 'e', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if new_owner ~= ARGV[1] then return {7, new_owner, epoch} end
return {1, epoch, redis.call('GET', KEYS[2]), reason}
"""

# --- forward (cluster: the receiving instance's slot) ---------------------------------------------
# KEYS[1] its liveness key, KEYS[2] its inbox, KEYS[3] its popped list
# ARGV[1] payload ("" = only ask whether it lives), ARGV[2] inbox TTL ms, ARGV[3] POPPED_KEEP
# Returns the ms its liveness key has left (the payload RPUSHed onto its inbox), or -1 when the
# incarnation is dead (nothing pushed; a dead incarnation never comes back).
FORWARD = """
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then return -1 end
if ARGV[1] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return pttl
"""

# --- give the lease (cluster hand-off, the session's slot) ---------------------------------------
# KEYS[1] lease(sid)
# ARGV[1] my incarnation, ARGV[2] my epoch, ARGV[3] target incarnation
# If the lease is still mine, it names the target (epoch + 1): returns 1, else 0. The activation
# message then goes onto the target's inbox with FORWARD (a dead target's leases are taken over).
GIVE = """
local lease = redis.call('HMGET', KEYS[1], 'o', 'e')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'o', ARGV[3], 'e', tonumber(lease[2]) + 1)
return 1
"""

# --- adopt due sessions (cluster sweeper, one partition's slot) -----------------------------------
# KEYS[1] the partition's deadlines zset, then lease(sid), checkpoint(sid) of each due session
# ARGV[1] my incarnation, ARGV[2] how many to adopt at most, ARGV[3] lease TTL ms,
# ARGV[4] n = number of sessions, ARGV[5 .. 4 + n] their ids (in KEYS order), then the
# incarnations the caller found dead
# Like ADOPT_ORPHANS, without reading liveness keys (other slots): a session is adopted when its
# lease is released or names a dead incarnation. Returns {checked, {my sid, ...}, {owner whose
# liveness the caller should look at, ...}, sid1, epoch1, checkpoint1, reason1, sid2, ...}.
ADOPT_DUE = _ADOPT_ONE + """
local n = tonumber(ARGV[4])
local dead = {}
for i = 5 + n, #ARGV do dead[ARGV[i]] = true end
local mine, unknown, seen = {}, {}, {}
local out = {0, mine, unknown}
local want = tonumber(ARGV[2])
for i = 1, n do
  local sid, lk, ck = ARGV[4 + i], KEYS[2 * i], KEYS[2 * i + 1]
  out[1] = i
  local lease = redis.call('HMGET', lk, 'o', 'e')
  local owner = lease[1]
  if owner == ARGV[1] then
    mine[#mine + 1] = sid
  elseif owner and owner ~= '' and not dead[owner] then
    if not seen[owner] then
      seen[owner] = true
      unknown[#unknown + 1] = owner
    end
  else
    adopt(out, sid, lk, ck, lease, ARGV[3])
    if #out >= want * 4 + 3 then break end
  end
end
return out
"""


_WRITE_KEYS = 5  # KEYS of FENCED_WRITE on one Redis (4 on a cluster: no liveness key)
# Positions in `fenced_write_argv` output (KEYS then ARGV, one Redis) of what is published: ARGV[5]
# message on ARGV[6] channel, ARGV[10] answer on ARGV[9] reply channel (ARGV[11], the version,
# follows). Only used with KAIROS_REDIS_MIN_REPLICAS_ACK.
_MESSAGE, _CHANNEL, _REPLY_CHANNEL, _ANSWER = 9, 10, 13, 14

# How long a write waits for KAIROS_REDIS_MIN_REPLICAS_ACK replicas (WAIT) before it is answered
# 503: a connected replica confirms within a millisecond or two; one that cannot for a second is
# cut off or far behind, and the client is better off retrying than hanging.
REPLICA_WAIT_MS = 1000


class ReplicationTimeout(RedisTimeoutError):
    """Fewer replicas than required confirmed a write in time: it is not acknowledged (503).

    A Redis TimeoutError, so every caller treats it as an unknown outcome (the router retries a
    claim until its deadline, an actor drops its memory and answers 503)."""


class Scripts:
    """The scripts registered on one client, and the few plain commands that touch our keys.

    Calls wait for a free pool connection instead of failing: redis-py's default pool raises
    "Too many connections" past `max_connections` (100), and a burst of concurrent commands on one
    host (e.g. hundreds of forwards) must queue, not error."""

    def __init__(self, redis: redis.asyncio.Redis, keys: Keys, *, min_replicas_ack: int = 0,
                 one_slot: bool | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # A Redis Cluster (or `one_slot`, which tests use on one Redis): every script keeps to
        # one slot; steps that reach another slot (an instance's liveness key or inbox) are
        # separate calls (see the cluster scripts above).
        self.cluster = is_cluster(redis) if one_slot is None else one_slot
        self._write_keys = 4 if self.cluster else _WRITE_KEYS
        # >= 1: writes and claims count only once that many replicas have them (WAIT, pipelined
        # with the script: same round trip), and nothing is published before that.
        self.min_replicas_ack = min_replicas_ack
        self._slots = max(1, connection_kwargs(redis).get("max_connections", 100) - _RESERVED_CONNECTIONS)
        self._limiter: anyio.CapacityLimiter | None = None
        # Incarnations seen dead (liveness key gone: never comes back): on a cluster their leases
        # are taken over without asking again.
        self.dead: set[str] = set()
        self._join = redis.register_script(JOIN)
        self._list = redis.register_script(LIST_INSTANCES)
        self._claim = redis.register_script(CLAIM_OR_FORWARD)
        self._write = redis.register_script(FENCED_WRITE)
        self._delete = redis.register_script(FENCED_DELETE)
        self._release = redis.register_script(RELEASE)
        self._adopt = redis.register_script(ADOPT_ORPHANS)
        self._hand_off = redis.register_script(HAND_OFF)
        self._pop = redis.register_script(POP_INBOX)
        self._count = redis.register_script(COUNT_REQUEST)
        self._claim_in_slot = redis.register_script(CLAIM)
        self._forward = redis.register_script(FORWARD)
        self._give = redis.register_script(GIVE)
        self._adopt_due = redis.register_script(ADOPT_DUE)
        self._reader: redis.asyncio.Redis | None = None  # see _inbox_reader
        self._unsure: dict[str, int] = {}  # incarnation -> entries its last (failed) read asked for

    def _inbox_reader(self) -> redis.asyncio.Redis:
        """The client of the inbox reads: it never sends a command again by itself (a re-sent pop
        would move the next entry and forget the one whose reply was lost); a failed read is
        followed by a re-read of the popped list instead."""
        if self._reader is None:
            if is_cluster(self.redis):
                self._reader = RedisCluster(
                    startup_nodes=[ClusterNode(n.host, n.port) for n in self.redis.get_nodes()]
                    or list(self.redis.nodes_manager.startup_nodes.values()),
                    retry=Retry(NoBackoff(), 0), max_connections=2,
                    **{k: v for k, v in self.redis.connection_kwargs.items() if k in _READER_OPTIONS})
                return self._reader
            pool = self.redis.connection_pool
            self._reader = redis_asyncio.Redis(connection_pool=redis_asyncio.ConnectionPool(
                connection_class=pool.connection_class, max_connections=2,
                **{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "retry_on_error": []}))
        return self._reader

    async def aclose(self) -> None:
        """Close the inbox reader's connections (the host's client is its owner's to close)."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.aclose()

    @asynccontextmanager
    async def _connection_slot(self) -> AsyncIterator[None]:
        limiter = self._limiter
        if limiter is None:  # created lazily: needs a running event loop
            limiter = self._limiter = anyio.CapacityLimiter(self._slots)
        # A free slot is taken without a checkpoint: anyio's acquire() always yields to the loop
        # (a shielded scope + sleep(0), ~20 us on every hot-path command); the call that follows
        # awaits the socket anyway.
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            yield
        finally:
            limiter.release()

    async def do_check_layout(self) -> None:
        """Record the partition count in Redis at the first start; refuse another one later
        (instances that disagreed would spell a session's keys differently: two owners)."""
        k = self.keys
        await self.redis.set(k.layout, k.partitions, nx=True)
        recorded = int(await self.redis.get(k.layout) or k.partitions)
        if recorded != k.partitions:
            raise ValueError(f"Redis holds data for {recorded} partitions under prefix {k.prefix!r}; "
                             f"this instance was started with {k.partitions} (KAIROS_REDIS_PARTITIONS)")

    # membership
    async def do_join(self, incarnation: str, info: bytes, ttl_ms: int) -> bool:
        """Create my liveness key (never overwrites) and list me among the instances."""
        k = self.keys
        if self.cluster:  # two slots: the liveness key first (what the others go by), then the set
            if not await self.redis.set(k.liveness(incarnation), info, px=ttl_ms, nx=True):
                return False
            await self.redis.sadd(k.instances, incarnation)
            return True
        return bool(await self._join(keys=[k.liveness(incarnation), k.instances], args=[incarnation, info, ttl_ms]))

    async def do_renew(self, incarnation: str, info: bytes, ttl_ms: int) -> bool:
        """Extend my liveness key; False once it has expired (SET XX never recreates it)."""
        return bool(await self.redis.set(self.keys.liveness(incarnation), info, px=ttl_ms, xx=True))

    async def do_leave(self, incarnation: str) -> None:
        """Delete my liveness key (clean shutdown): my leases become claimable at once."""
        await self.redis.delete(self.keys.liveness(incarnation))

    async def do_list_instances(self) -> list[bytes]:
        """Info JSON of every live instance."""
        k = self.keys
        if not self.cluster:
            return list(await self._list(keys=[k.instances], args=[k.prefix]))
        members = [m.decode() for m in await self.redis.smembers(k.instances)]
        pipe = self.redis.pipeline(transaction=False)
        for inc in members:
            pipe.get(k.liveness(inc))
        infos = await pipe.execute() if members else []
        gone = [inc for inc, info in zip(members, infos, strict=True) if info is None]
        if gone:
            for inc in gone:
                self._remember_dead(inc)
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(k.instances, *gone)
            for inc in gone:
                pipe.delete(k.inbox_popped(inc))
            await pipe.execute()
        return [info for info in infos if info is not None]

    # leases and checkpoints
    async def do_claim_or_forward(
        self, incarnation: str, session_id: str, *, may_claim: bool, payload: bytes = b"",
        claim_for: str = "", owner_hint: str = "",
    ) -> list[Any]:
        """See CLAIM_OR_FORWARD for the reply shapes. `owner_hint` (the owner last seen): on a
        cluster the payload goes straight to its inbox, one round trip (the owner answers MOVED
        if it no longer owns the session)."""
        if self.cluster:
            async with self._connection_slot():
                return await self._claim_or_forward_cluster(
                    incarnation, session_id, may_claim, payload, claim_for, owner_hint)
        k = self.keys
        keys = [k.lease(session_id), k.liveness(incarnation), k.checkpoint(session_id)]
        args = [incarnation, k.prefix, "1" if may_claim else "0", payload, INBOX_TTL_MS, CHECKPOINT_TTL_MS, claim_for,
                POPPED_KEEP]
        async with self._connection_slot():
            return await self._claim_with(self._claim, keys, args)

    async def _claim_with(self, script: Any, keys: list[Any], args: list[Any]) -> list[Any]:
        """A claim script (KEYS[1] the lease, ARGV[1] my incarnation); with `min_replicas_ack`,
        a claim fewer replicas confirmed is given back (a failover could undo it) and raised."""
        if not self.min_replicas_ack:
            return list(await script(keys=keys, args=args))
        answer, acked = await self._replicated(script, keys, args)
        if answer[0] == 1 and acked < self.min_replicas_ack:
            await self._release(keys=keys[:1], args=[args[0], answer[1]])  # the next ask claims again
            raise ReplicationTimeout(f"claim of {keys[0]} reached {acked} replicas")
        return list(answer)

    async def _claim_or_forward_cluster(
        self, incarnation: str, session_id: str, may_claim: bool, payload: bytes, claim_for: str, owner_hint: str,
    ) -> list[Any]:
        """CLAIM_OR_FORWARD in two slots: the lease (CLAIM), then the owner's liveness key and
        inbox (FORWARD); a dead owner's lease is then taken over by CLAIM with its name."""
        if owner_hint and payload and not may_claim and owner_hint not in self.dead:
            pttl = await self._forward_to(owner_hint, payload)
            if pttl >= 0:
                return [2, owner_hint.encode(), pttl]
        k = self.keys
        dead = ""
        for _attempt in range(3):  # a dead owner is taken over on the next attempt
            answer = await self._claim_with(
                self._claim_in_slot, [k.lease(session_id), k.checkpoint(session_id)],
                [incarnation, "1" if may_claim else "0", CHECKPOINT_TTL_MS, claim_for, dead])
            if answer[0] == 7:  # claimed for our successor: the command goes to it
                if not payload:
                    return [4]
                pttl = await self._forward_to(claim_for, payload)
                return [2, answer[1], pttl] if pttl >= 0 else [4]
            if answer[0] != 6:
                return list(answer)
            owner = answer[1].decode()
            pttl = -1 if owner in self.dead else await self._forward_to(owner, payload)
            if pttl >= 0:
                return [2 if payload else 3, answer[1], pttl]
            dead = owner
        return [4]

    async def _forward_to(self, incarnation: str, payload: bytes) -> int:
        """FORWARD: push `payload` onto a live incarnation's inbox (b"": only ask); the ms its
        liveness key has left, -1 if it is dead (remembered)."""
        k = self.keys
        pttl = int(await self._forward(
            keys=[k.liveness(incarnation), k.inbox(incarnation), k.inbox_popped(incarnation)],
            args=[payload, INBOX_TTL_MS, POPPED_KEEP]))
        if pttl < 0:
            self._remember_dead(incarnation)
        return pttl

    def _remember_dead(self, incarnation: str) -> None:
        if len(self.dead) >= _MAX_DEAD:  # forgetting is safe: it is only asked again
            self.dead.clear()
        self.dead.add(incarnation)

    async def _replicated(self, script: Any, keys: list[Any], args: list[Any]) -> tuple[Any, int]:
        """One script call and WAIT in one round trip: (its answer, replicas that confirmed it)."""
        for _attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            self._wait(pipe, keys[:1])
            answer, acked = await self._execute_waited(pipe)
            if not isinstance(answer, NoScriptError):
                break
            script.sha = await self.redis.script_load(script.script)  # Redis lost its script cache
        for value in (answer, acked):
            if isinstance(value, Exception):
                raise value
        return answer, int(acked)

    def _wait(self, pipe: Any, keys: list[Any]) -> int:
        """Queue WAIT after the writes queued on `pipe` (to `keys`' slots); returns how many were
        queued. WAIT counts the writes of its own connection: on a cluster one goes to each node
        written to, which a cluster pipeline sends on the same connection, after them."""
        if not is_cluster(self.redis):
            pipe.execute_command("WAIT", self.min_replicas_ack, REPLICA_WAIT_MS)
            return 1
        nodes = {node.name: node for node in map(self.redis.get_node_from_key, keys)}
        for node in nodes.values():
            pipe.execute_command("WAIT", self.min_replicas_ack, REPLICA_WAIT_MS, target_nodes=node)
        return len(nodes)

    async def _execute_waited(self, pipe: Any) -> list[Any]:
        """Run a pipeline with WAITs (answers and errors in place). On a cluster a redirected write
        is not sent again: elsewhere it would escape its WAIT. It fails (retried by its caller)
        and its slot is moved in the client's map, as a plain command's MOVED would."""
        if not is_cluster(self.redis):
            return list(await pipe.execute(raise_on_error=False))
        answers = list(await pipe.execute(raise_on_error=False, allow_redirections=False))
        for answer in answers:
            if isinstance(answer, MovedError):
                await self.redis.nodes_manager.move_slot(answer)
        return answers

    def fenced_write_argv(
        self, incarnation: str, epoch: int, session_id: str, checkpoint: bytes, message: bytes,
        deadline_ms: int | None, reply: tuple[str, bytes] | None = None, *, version: int | None = None,
    ) -> tuple[Any, ...]:
        """KEYS then ARGV of one FENCED_WRITE (for `do_fenced_write` / `do_fenced_writes`)."""
        return (*self._session_keys(incarnation, session_id),
                incarnation, epoch, checkpoint, CHECKPOINT_TTL_MS, message, self.keys.channel(session_id),
                session_id, "" if deadline_ms is None else deadline_ms,
                *(reply if reply is not None else ("", "")), "" if version is None else version)

    async def do_fenced_write(
        self, incarnation: str, epoch: int, session_id: str, checkpoint: bytes, message: bytes,
        deadline_ms: int | None, reply: tuple[str, bytes] | None = None, *, version: int | None = None,
    ) -> int:
        """Write checkpoint + outbox + publish + deadline if I still hold the lease and `version`
        is the next one: 1 / 2 (already written) / 0 / -1."""
        argv = self.fenced_write_argv(incarnation, epoch, session_id, checkpoint, message, deadline_ms, reply,
                                      version=version)
        return await self.do_fenced_write_argv(argv)

    async def do_fenced_write_argv(self, argv: tuple[Any, ...]) -> int:
        """One FENCED_WRITE from `fenced_write_argv` output."""
        if self.min_replicas_ack:
            (result,) = await self.do_fenced_writes([argv])
            if isinstance(result, Exception):
                raise result
            return int(result)
        async with self._connection_slot():
            return await self._write(keys=argv[:self._write_keys], args=argv[self._write_keys:])

    async def do_fenced_writes(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """Several FENCED_WRITEs in one round trip (pipelined, each still its own atomic script):
        a result (1 / 2 / 0 / -1) or an exception per entry."""
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        replicas = self.min_replicas_ack
        if replicas:  # publish only what replicas confirmed: strip the publishing from the script
            withheld = batch
            batch = [(*argv[:_CHANNEL], "", *argv[_CHANNEL + 1:_ANSWER], "", *argv[_ANSWER + 1:]) for argv in batch]
        acked = replicas
        async with self._connection_slot():
            for _attempt in range(2):
                pipe = self.redis.pipeline(transaction=False)
                for i in todo:
                    # execute_command, not evalsha(): redis-py's cluster pipeline refuses the
                    # latter but routes this by the script's keys (all in one slot)
                    pipe.execute_command("EVALSHA", self._write.sha, self._write_keys, *batch[i])
                if replicas:  # each attempt's WAITs cover its own writes: the least counts
                    waits = self._wait(pipe, [batch[i][0] for i in todo])
                    answers = await self._execute_waited(pipe)
                    for confirmed in answers[-waits:]:
                        acked = min(acked, confirmed if isinstance(confirmed, int) else 0)
                    del answers[-waits:]
                else:
                    answers = await pipe.execute(raise_on_error=False)
                for i, answer in zip(todo, answers, strict=True):
                    results[i] = answer
                todo = [i for i in todo if isinstance(results[i], NoScriptError)]
                if not todo:
                    break
                # Redis lost its script cache (restart): those entries did not run; load and redo.
                self._write.sha = await self.redis.script_load(FENCED_WRITE)
            if replicas:
                await self._publish_replicated(results, acked, [
                    [(a[_CHANNEL], a[_MESSAGE]), (a[_REPLY_CHANNEL], a[_ANSWER])] for a in withheld])
        return results

    async def _publish_replicated(self, results: list[Any], acked: int, messages: list[list[tuple[Any, Any]]]) -> None:
        """After a WAIT: fail the writes fewer than `min_replicas_ack` replicas confirmed (in
        place), publish the messages of the others (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for i, result in enumerate(results):
            if result not in (1, 2):  # 2: a repeat of a write whose answer (and publish) was lost
                continue
            if acked < self.min_replicas_ack:
                results[i] = ReplicationTimeout(f"write reached {acked} of {self.min_replicas_ack} replicas")
                continue
            for channel, data in messages[i]:
                if channel and data:  # execute_command: a cluster pipeline refuses publish()
                    pipe.execute_command("PUBLISH", channel, data)
        if len(pipe):
            await pipe.execute()

    def _session_keys(self, incarnation: str, session_id: str) -> list[str]:
        """KEYS of FENCED_WRITE / FENCED_DELETE (my liveness key only on one Redis)."""
        k = self.keys
        p = k.partition(session_id)
        keys = [k.lease(session_id), k.checkpoint(session_id), k.outbox_of(p), k.deadlines_of(p)]
        if not self.cluster:
            keys.append(k.liveness(incarnation))
        return keys

    async def do_fenced_delete(self, incarnation: str, epoch: int, session_id: str, message: bytes) -> int:
        """Delete checkpoint, release lease, outbox + publish the deletion: 1 / 2 (already deleted) /
        0 / -1."""
        k = self.keys
        keys = self._session_keys(incarnation, session_id)
        async with self._connection_slot():
            if not self.min_replicas_ack:
                return await self._delete(keys=keys, args=[incarnation, epoch, message, k.channel(session_id), session_id])
            answer, acked = await self._replicated(self._delete, keys, [incarnation, epoch, message, "", session_id])
            results = [answer]
            await self._publish_replicated(results, acked, [[(k.channel(session_id), message)]])
        if isinstance(results[0], Exception):
            raise results[0]
        return int(answer)

    async def do_release(self, incarnation: str, epoch: int, session_id: str) -> bool:
        """Release the lease if it is still mine (passivation, drain)."""
        async with self._connection_slot():
            return bool(await self._release(keys=[self.keys.lease(session_id)], args=[incarnation, epoch]))

    async def do_load_checkpoint(self, session_id: str) -> bytes | None:
        """The stored checkpoint bytes (reads for `get` on a session owned elsewhere)."""
        async with self._connection_slot():
            return await self.redis.get(self.keys.checkpoint(session_id))

    async def do_adopt_orphans(
        self, incarnation: str, *, until_ms: int, scan: int, batch: int, offset: int = 0, partition: int = 0,
    ) -> tuple[int, int, list[tuple[str, int, bytes, str]], list[str]] | None:
        """Claim orphaned sessions of `partition` due before `until_ms`, looking at `scan` entries
        from `offset`: (entries checked, entries fetched, [(sid, epoch, checkpoint, reason)]
        claimed, [sid] whose lease names me already), None if I am not alive."""
        k = self.keys
        if self.cluster:
            async with self._connection_slot():
                checked, fetched, found, mine, acked = await self._adopt_cluster(
                    incarnation, until_ms, scan, batch, offset, partition)
        else:
            keys = [k.deadlines_of(partition), k.liveness(incarnation)]
            args = [incarnation, k.prefix, until_ms, scan, batch, CHECKPOINT_TTL_MS, offset,
                    k.session_prefix(partition)]
            async with self._connection_slot():
                flat, acked = await self._adopt_with(self._adopt, keys, args)
            if flat[0] == -1:
                return None
            checked, fetched, mine = int(flat[0]), int(flat[1]), [sid.decode() for sid in flat[2]]
            found = [(flat[i].decode(), int(flat[i + 1]), flat[i + 2], flat[i + 3].decode())
                     for i in range(3, len(flat), 4)]
        if found and acked < self.min_replicas_ack:
            # Claims a failover could undo are given back (released: the next sweep adopts them).
            for sid, epoch, *_ in found:
                await self.do_release(incarnation, epoch, sid)
            raise ReplicationTimeout(f"adoption of {len(found)} sessions reached {acked} replicas")
        return checked, fetched, found, mine

    async def _adopt_with(self, script: Any, keys: list[Any], args: list[Any]) -> tuple[list[Any], int]:
        """An adoption script's answer and the replicas that confirmed it (0 without `min_replicas_ack`)."""
        if not self.min_replicas_ack:
            return list(await script(keys=keys, args=args)), 0
        flat, acked = await self._replicated(script, keys, args)
        return list(flat), acked

    async def _adopt_cluster(
        self, incarnation: str, until_ms: int, scan: int, batch: int, offset: int, partition: int,
    ) -> tuple[int, int, list[tuple[str, int, bytes, str]], list[str], int]:
        """ADOPT_ORPHANS on a cluster: the due entries (ZRANGEBYSCORE), ADOPT_DUE with their keys
        declared; owners it could not judge are looked up (their liveness keys, other slots) and,
        if some are dead, ADOPT_DUE runs again with them named. Last: the replicas that confirmed."""
        k = self.keys
        due = [sid.decode() for sid in await self.redis.zrangebyscore(
            k.deadlines_of(partition), "-inf", until_ms, start=offset, num=scan)]
        acked = self.min_replicas_ack
        if not due:
            return 0, 0, [], [], acked

        async def adopt(sids: list[str], dead: list[str], want: int) -> list[Any]:
            nonlocal acked
            keys = [k.deadlines_of(partition)]
            for sid in sids:
                keys += [k.lease(sid), k.checkpoint(sid)]
            flat, confirmed = await self._adopt_with(
                self._adopt_due, keys, [incarnation, want, CHECKPOINT_TTL_MS, len(sids), *sids, *dead])
            acked = min(acked, confirmed) if self.min_replicas_ack else 0
            return flat

        def claimed(flat: list[Any]) -> list[tuple[str, int, bytes, str]]:
            return [(flat[i].decode(), int(flat[i + 1]), flat[i + 2], flat[i + 3].decode())
                    for i in range(3, len(flat), 4)]

        flat = await adopt(due, [], batch)
        checked, found, mine = int(flat[0]), claimed(flat), [sid.decode() for sid in flat[1]]
        unknown = [owner.decode() for owner in flat[2]]
        if unknown and len(found) < batch:
            ask = [owner for owner in unknown if owner not in self.dead]
            if ask:
                pipe = self.redis.pipeline(transaction=False)
                for owner in ask:
                    pipe.exists(k.liveness(owner))
                for owner, alive in zip(ask, await pipe.execute(), strict=True):
                    if not alive:
                        self._remember_dead(owner)
            dead = [owner for owner in unknown if owner in self.dead]
            if dead:  # again, naming them, for the entries the first pass left to their owners
                done = {sid for sid, *_ in found} | set(mine)
                rest = [sid for sid in due[:checked] if sid not in done]
                found += claimed(await adopt(rest, dead, batch - len(found)))
        return checked, len(due), found, mine, acked

    async def do_hand_off(self, incarnation: str, epoch: int, session_id: str, target: str, message: bytes) -> int:
        """Give my lease to `target` and queue `message` (activate now) on its inbox: 1 / 2 / 0."""
        k = self.keys
        if self.cluster:
            async with self._connection_slot():
                if not await self._give(keys=[k.lease(session_id)], args=[incarnation, epoch, target]):
                    return 0
                # A dead target: its leases are taken over (sweeper, next command).
                return 1 if await self._forward_to(target, message) >= 0 else 2
        async with self._connection_slot():
            return int(await self._hand_off(
                keys=[k.lease(session_id), k.inbox(target), k.liveness(target)],
                args=[incarnation, epoch, target, message, INBOX_TTL_MS]))

    async def do_reply(self, channel: str, data: bytes) -> None:
        """Answer a forwarded command on the asker's reply channel."""
        async with self._connection_slot():
            await self.redis.publish(channel, data)

    async def do_pop_inbox(self, incarnation: str, timeout_s: int) -> list[bytes]:
        """The next forwarded command for `incarnation` ([] after `timeout_s`), or what the last
        read may have taken if its reply was lost (entries may come twice: requests carry ids)."""
        again = await self._read_again(incarnation)
        if again is not None:
            return again
        k = self.keys
        try:
            item = await self._inbox_reader().blmove(
                k.inbox(incarnation), k.inbox_popped(incarnation), timeout_s, "LEFT", "LEFT")
        except Exception:
            self._unsure[incarnation] = 1
            raise
        return [] if item is None else [item]

    async def do_pop_inbox_batch(self, incarnation: str, count: int) -> list[bytes]:
        """Up to `count` queued forwarded commands at once, without waiting (see `do_pop_inbox`)."""
        again = await self._read_again(incarnation)
        if again is not None:
            return again
        k = self.keys
        try:
            return list(await self._pop(keys=[k.inbox(incarnation), k.inbox_popped(incarnation)],
                                        args=[count, INBOX_TTL_MS, POPPED_KEEP], client=self._inbox_reader()))
        except Exception:
            self._unsure[incarnation] = count
            raise

    async def _read_again(self, incarnation: str) -> list[bytes] | None:
        """After a failed read: the entries it may have taken, oldest first (None when the last
        read went well). Some may have been read before: the caller drops repeated requests."""
        count = self._unsure.get(incarnation)
        if count is None:
            return None
        newest_first = await self._inbox_reader().lrange(self.keys.inbox_popped(incarnation), 0, count - 1)
        del self._unsure[incarnation]
        return newest_first[::-1]

    async def do_count_request(self, caller: str, window: int, window_ms: int) -> int:
        """Count one request of `caller` in window number `window`: the count so far, this one
        included (one round trip, all instances together)."""
        async with self._connection_slot():
            return int(await self._count(keys=[self.keys.requests(caller, window)], args=[window_ms]))

    async def was_deleted(self, session_id: str) -> bool:
        """True if the session was deleted (tombstone on its lease): never restore it from audit."""
        async with self._connection_slot():
            return bool(await self.redis.hexists(self.keys.lease(session_id), "d"))

    async def do_read_lease(self, session_id: str) -> tuple[str, int]:
        """(owner incarnation or "", epoch) — for admin views and tests."""
        o, e = await self.redis.hmget(self.keys.lease(session_id), "o", "e")
        return ((o or b"").decode(), int(e or 0))
