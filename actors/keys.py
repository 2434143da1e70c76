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

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

# Consumer groups on the outbox stream (`Keys.outbox`): each group sees every entry once.
AUDIT_GROUP = "audit"  # copies events into PostgreSQL (actors/outbox/audit.py)
PUSH_GROUP = "push"  # turns events into FCM notifications (actors/outbox/push.py)


class Keys:
    """Key and channel names under one deployment prefix (`KAIROS_KEY_PREFIX`)."""

    def __init__(self, prefix: str = "kairos:") -> None:
        self.prefix = prefix

    def checkpoint(self, session_id: str) -> str:
        """String: the session's checkpoint bytes (`kairos.encode`)."""
        return f"{self.prefix}s:{session_id}:cp"

    def lease(self, session_id: str) -> str:
        """Hash {o: owner incarnation or "", e: epoch, v: version last written under it (absent
        when unknown), d: "1" once deleted (tombstone)}."""
        return f"{self.prefix}s:{session_id}:lease"

    def channel(self, session_id: str) -> str:
        """Pub/sub channel carrying the session's update messages (`kairos.wire.update_message`)."""
        return f"{self.prefix}s:{session_id}:ch"

    def liveness(self, incarnation: str) -> str:
        """String with TTL: the instance's info (JSON) while the incarnation is alive.

        Spelled again inside Lua as PREFIX .. 'i:' .. inc .. ':alive'."""
        return f"{self.prefix}i:{incarnation}:alive"

    def inbox(self, incarnation: str) -> str:
        """List of forwarded commands for the incarnation. Lua: PREFIX .. 'i:' .. inc .. ':inbox'."""
        return f"{self.prefix}i:{incarnation}:inbox"

    def inbox_popped(self, incarnation: str) -> str:
        """List, newest first: entries the incarnation's inbox reads took (the last POPPED_KEEP),
        so an entry whose read reply was lost is read again, not lost. Lua: ... .. ':popped'."""
        return f"{self.prefix}i:{incarnation}:popped"

    def reply_channel(self, incarnation: str) -> str:
        """Pub/sub channel on which owners answer forwarded commands."""
        return f"{self.prefix}i:{incarnation}:replies"

    @property
    def instances(self) -> str:
        """Set of incarnations that joined (dead ones are pruned when the list is read)."""
        return f"{self.prefix}instances"

    @property
    def deadlines(self) -> str:
        """Sorted set: session_id scored by its next deadline (running sessions only)."""
        return f"{self.prefix}deadlines"

    @property
    def outbox(self) -> str:
        """The outbox stream: one entry per accepted change, field `m` = update message bytes."""
        return f"{self.prefix}outbox"

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
  local info = redis.call('GET', ARGV[1] .. 'i:' .. inc .. ':alive')
  if info then
    out[#out + 1] = info
  else
    redis.call('SREM', KEYS[1], inc)
    redis.call('DEL', ARGV[1] .. 'i:' .. inc .. ':popped')
  end
end
return out
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
local function forward(inc)
  local inbox, popped = ARGV[2] .. 'i:' .. inc .. ':inbox', ARGV[2] .. 'i:' .. inc .. ':popped'
  redis.call('RPUSH', inbox, ARGV[4])
  redis.call('PEXPIRE', inbox, ARGV[5])
  redis.call('LTRIM', popped, 0, tonumber(ARGV[8]) - 1)
  redis.call('PEXPIRE', popped, ARGV[5])
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
local lease = redis.call('HMGET', KEYS[1], 'o', 'e')
local owner = lease[1]
local epoch = tonumber(lease[2] or '0')
local reason = 'new'
if owner and owner ~= '' then
  if owner == ARGV[1] then
    if ARGV[3] ~= '1' then return {5} end
    reason = 'self'
  else
    local pttl = redis.call('PTTL', ARGV[2] .. 'i:' .. owner .. ':alive')
    if pttl < 0 then
      reason = 'takeover'
    else
      if ARGV[4] == '' then return {3, owner, pttl} end
      forward(owner)
      return {2, owner, pttl}
    end
  end
elseif owner == '' then
  reason = 'released'
end
if ARGV[3] ~= '1' then return {4} end
epoch = epoch + 1
if ARGV[7] ~= '' and ARGV[7] ~= ARGV[1] then
  local pttl = redis.call('PTTL', ARGV[2] .. 'i:' .. ARGV[7] .. ':alive')
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
# KEYS[1] lease(sid), KEYS[2] my liveness key, KEYS[3] checkpoint(sid), KEYS[4] outbox stream,
# KEYS[5] deadlines zset
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
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local lease = redis.call('HMGET', KEYS[1], 'o', 'e', 'v')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
if ARGV[11] ~= '' and lease[3] then
  local written, v = tonumber(lease[3]), tonumber(ARGV[11])
  if written == v then return 2 end
  if written ~= v - 1 then return 0 end
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
if ARGV[11] ~= '' then
  redis.call('HDEL', KEYS[1], 'd')  -- re-created after a delete: no longer a tombstone
  redis.call('HSET', KEYS[1], 'v', ARGV[11])
else
  redis.call('HDEL', KEYS[1], 'd', 'v')
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[4], '*', 'm', ARGV[5])
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[5]) end
end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[8], ARGV[7])
else
  redis.call('ZREM', KEYS[5], ARGV[7])
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
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local lease = redis.call('HMGET', KEYS[1], 'o', 'e', 'd')
if lease[1] == '' and lease[2] == ARGV[2] and lease[3] == '1' then return 2 end
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[1], 'o', '', 'd', '1')
redis.call('HDEL', KEYS[1], 'v')
redis.call('XADD', KEYS[4], '*', 'm', ARGV[3])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[3]) end
redis.call('ZREM', KEYS[5], ARGV[5])
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


# Pool connections left for the long-lived readers (reply pub/sub, renewal, spare; the inbox reads
# have a client of their own).
_RESERVED_CONNECTIONS = 4


# --- adopt orphans (the sweeper) ----------------------------------------------------------------
# KEYS[1] deadlines zset, KEYS[2] my liveness key
# ARGV[1] my incarnation, ARGV[2] key prefix, ARGV[3] max deadline ms (now + horizon),
# ARGV[4] how many due entries to look at, ARGV[5] how many to adopt at most, ARGV[6] lease TTL ms,
# ARGV[7] offset into the due entries (sweeps page through them when there are many)
# Looks at due deadlines; a session whose lease is released or whose owner's liveness key is
# gone is claimed for me (epoch + 1); entries without a checkpoint are dropped. Sessions whose
# lease names me are listed too: the caller re-activates those it has no actor for (one whose
# write failed while Redis was away), so their deadline still fires.
# Lua spells PREFIX .. 's:' .. sid .. ':lease' / ':cp' as Keys.lease / Keys.checkpoint.
# Returns {checked, fetched, {my sid, ...}, sid1, epoch1, checkpoint1, reason1, sid2, ...} ({-1}
# if my liveness key is gone); reason as CLAIM_OR_FORWARD's (released: a clean stop or
# passivation let it go; takeover: its owner died); `checked` < `fetched` when the adoption
# batch filled up first.
ADOPT_ORPHANS = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', ARGV[7], ARGV[4])
local mine = {}
local out = {0, #due, mine}
local want = tonumber(ARGV[5])
for _, sid in ipairs(due) do
  out[1] = out[1] + 1
  local lk = ARGV[2] .. 's:' .. sid .. ':lease'
  local lease = redis.call('HMGET', lk, 'o', 'e')
  local owner = lease[1]
  if owner == ARGV[1] then
    mine[#mine + 1] = sid
  elseif not owner or owner == '' or
     (owner ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. 'i:' .. owner .. ':alive') == 0) then
    local cp = redis.call('GET', ARGV[2] .. 's:' .. sid .. ':cp')
    if not cp then
      redis.call('ZREM', KEYS[1], sid)
    else
      local epoch = tonumber(lease[2] or '0') + 1
      redis.call('HSET', lk, 'o', ARGV[1], 'e', epoch)
      redis.call('PEXPIRE', lk, ARGV[6])
      out[#out + 1] = sid
      out[#out + 1] = epoch
      out[#out + 1] = cp
      if not owner then out[#out + 1] = 'new' elseif owner == '' then out[#out + 1] = 'released'
      else out[#out + 1] = 'takeover' end
      if #out >= want * 4 + 3 then break end
    end
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


_WRITE_KEYS = 5  # KEYS of FENCED_WRITE
# Positions in `fenced_write_argv` output (KEYS then ARGV) of what is published: ARGV[5] message
# on ARGV[6] channel, ARGV[10] answer on ARGV[9] reply channel (ARGV[11], the version, follows).
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

    def __init__(self, redis: redis.asyncio.Redis, keys: Keys, *, min_replicas_ack: int = 0) -> None:
        self.redis = redis
        self.keys = keys
        # >= 1: writes and claims count only once that many replicas have them (WAIT, pipelined
        # with the script: same round trip), and nothing is published before that.
        self.min_replicas_ack = min_replicas_ack
        self._slots = max(1, getattr(redis.connection_pool, "max_connections", 100) - _RESERVED_CONNECTIONS)
        self._limiter: anyio.CapacityLimiter | None = None
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
        self._reader: redis.asyncio.Redis | None = None  # see _inbox_reader
        self._unsure: dict[str, int] = {}  # incarnation -> entries its last (failed) read asked for

    def _inbox_reader(self) -> redis.asyncio.Redis:
        """The client of the inbox reads: it never sends a command again by itself (a re-sent pop
        would move the next entry and forget the one whose reply was lost); a failed read is
        followed by a re-read of the popped list instead."""
        if self._reader is None:
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

    # membership
    async def do_join(self, incarnation: str, info: bytes, ttl_ms: int) -> bool:
        """Create my liveness key (never overwrites) and list me among the instances."""
        k = self.keys
        return bool(await self._join(keys=[k.liveness(incarnation), k.instances], args=[incarnation, info, ttl_ms]))

    async def do_renew(self, incarnation: str, info: bytes, ttl_ms: int) -> bool:
        """Extend my liveness key; False once it has expired (SET XX never recreates it)."""
        return bool(await self.redis.set(self.keys.liveness(incarnation), info, px=ttl_ms, xx=True))

    async def do_leave(self, incarnation: str) -> None:
        """Delete my liveness key (clean shutdown): my leases become claimable at once."""
        await self.redis.delete(self.keys.liveness(incarnation))

    async def do_list_instances(self) -> list[bytes]:
        """Info JSON of every live instance."""
        return list(await self._list(keys=[self.keys.instances], args=[self.keys.prefix]))

    # leases and checkpoints
    async def do_claim_or_forward(
        self, incarnation: str, session_id: str, *, may_claim: bool, payload: bytes = b"",
        claim_for: str = "",
    ) -> list[Any]:
        """See CLAIM_OR_FORWARD for the reply shapes."""
        k = self.keys
        keys = [k.lease(session_id), k.liveness(incarnation), k.checkpoint(session_id)]
        args = [incarnation, k.prefix, "1" if may_claim else "0", payload, INBOX_TTL_MS, CHECKPOINT_TTL_MS, claim_for,
                POPPED_KEEP]
        async with self._connection_slot():
            if not self.min_replicas_ack:
                return await self._claim(keys=keys, args=args)
            answer, acked = await self._replicated(self._claim, keys, args)
            if answer[0] == 1 and acked < self.min_replicas_ack:
                # Never act on a claim a failover could undo: give it back (the next ask claims again).
                await self._release(keys=keys[:1], args=[incarnation, answer[1]])
                raise ReplicationTimeout(f"claim of {session_id} reached {acked} replicas")
            return answer

    async def _replicated(self, script: Any, keys: list[Any], args: list[Any]) -> tuple[Any, int]:
        """One script call and WAIT in one round trip: (its answer, replicas that confirmed it)."""
        for _attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas_ack, REPLICA_WAIT_MS)
            answer, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(answer, NoScriptError):
                break
            script.sha = await self.redis.script_load(script.script)  # Redis lost its script cache
        for value in (answer, acked):
            if isinstance(value, Exception):
                raise value
        return answer, int(acked)

    def fenced_write_argv(
        self, incarnation: str, epoch: int, session_id: str, checkpoint: bytes, message: bytes,
        deadline_ms: int | None, reply: tuple[str, bytes] | None = None, *, version: int | None = None,
    ) -> tuple[Any, ...]:
        """KEYS then ARGV of one FENCED_WRITE (for `do_fenced_write` / `do_fenced_writes`)."""
        k = self.keys
        return (k.lease(session_id), k.liveness(incarnation), k.checkpoint(session_id), k.outbox, k.deadlines,
                incarnation, epoch, checkpoint, CHECKPOINT_TTL_MS, message, k.channel(session_id),
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
            return await self._write(keys=argv[:_WRITE_KEYS], args=argv[_WRITE_KEYS:])

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
                    pipe.evalsha(self._write.sha, _WRITE_KEYS, *batch[i])
                if replicas:
                    pipe.execute_command("WAIT", replicas, REPLICA_WAIT_MS)
                answers = await pipe.execute(raise_on_error=False)
                if replicas:  # each attempt's WAIT covers its own writes: the least counts
                    last = answers.pop()
                    acked = min(acked, last if isinstance(last, int) else 0)
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
                if channel and data:
                    pipe.publish(channel, data)
        if len(pipe):
            await pipe.execute()

    async def do_fenced_delete(self, incarnation: str, epoch: int, session_id: str, message: bytes) -> int:
        """Delete checkpoint, release lease, outbox + publish the deletion: 1 / 2 (already deleted) /
        0 / -1."""
        k = self.keys
        keys = [k.lease(session_id), k.liveness(incarnation), k.checkpoint(session_id), k.outbox, k.deadlines]
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
        self, incarnation: str, *, until_ms: int, scan: int, batch: int, offset: int = 0
    ) -> tuple[int, int, list[tuple[str, int, bytes, str]], list[str]] | None:
        """Claim orphaned sessions due before `until_ms`, looking at `scan` entries from `offset`:
        (entries checked, entries fetched, [(sid, epoch, checkpoint, reason)] claimed, [sid] whose
        lease names me already), None if I am not alive."""
        k = self.keys
        keys = [k.deadlines, k.liveness(incarnation)]
        args = [incarnation, k.prefix, until_ms, scan, batch, CHECKPOINT_TTL_MS, offset]
        async with self._connection_slot():
            if self.min_replicas_ack:
                flat, acked = await self._replicated(self._adopt, keys, args)
            else:
                flat, acked = await self._adopt(keys=keys, args=args), 0
        if flat[0] == -1:
            return None
        found = [(flat[i].decode(), int(flat[i + 1]), flat[i + 2], flat[i + 3].decode())
                 for i in range(3, len(flat), 4)]
        if found and acked < self.min_replicas_ack:
            # Claims a failover could undo are given back (released: the next sweep adopts them).
            for sid, epoch, *_ in found:
                await self.do_release(incarnation, epoch, sid)
            raise ReplicationTimeout(f"adoption of {len(found)} sessions reached {acked} replicas")
        return int(flat[0]), int(flat[1]), found, [sid.decode() for sid in flat[2]]

    async def do_hand_off(self, incarnation: str, epoch: int, session_id: str, target: str, message: bytes) -> int:
        """Give my lease to `target` and queue `message` (activate now) on its inbox: 1 / 2 / 0."""
        k = self.keys
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
