"""A throw-away single-node Ceph cluster for tests and benchmarks: one mon, one mgr, one memstore OSD
and radosgw on 127.0.0.1, from Debian 12's packages (Pacific 16.2), without systemd, in a temp dir.

Up in 3-5 s, about 300 MiB plus the data; nothing listens on anything but loopback. Every setting
below is one measured on these machines (issue #19):
- paxos_propose_interval = 0.05: with the default 1 s radosgw takes ~9 s to start;
- pool size 1 (mon_allow_pool_size_one), small pg_num, no autoscaler: one OSD can hold everything;
- readiness = HEALTH_OK + mgr available + all PGs active+clean (HEALTH_OK appears before any mgr);
- ms_mon_client_mode = crc for radosgw; admin sockets under the temp dir (paths < 108 bytes);
- stop radosgw and mgr before the OSD (their clean shutdown needs it), the OSD with SIGKILL
  (memstore would dump its RAM to disk on SIGTERM), the mon last.

Usage: python -m imgkit.testing.ceph_cluster up DIR   (prints shell-style env lines)
       python -m imgkit.testing.ceph_cluster down DIR
scripts/ceph-up.sh and ceph-down.sh wrap these two.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

DAEMONS = ("mon.a", "osd.0", "mgr.x", "rgw.x")
S3_KEY, S3_SECRET = "imgkittestkey", "imgkittestsecret"
RBD_POOL = "rbd"
MGR_DISABLED = ("alerts influx insights iostat localpool mirroring nfs osd_perf_query osd_support prometheus "
                "restful selftest snap_schedule stats telegraf test_orchestrator zabbix diskprediction_local")


class ClusterError(RuntimeError):
    pass


@dataclass
class Cluster:
    directory: str
    conf: str
    s3_endpoint: str
    access_key: str = S3_KEY
    secret_key: str = S3_SECRET
    rbd_pool: str = RBD_POOL

    def env(self) -> dict[str, str]:
        """What a client (imgkit, boto3, the ceph tools, qemu's rbd driver) needs to reach the cluster."""
        return {"CEPH_CONF": self.conf, "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "RBD_POOL": self.rbd_pool}

    def stop(self) -> None:
        stop(self.directory)


def available() -> str | None:
    """None if this machine can start a cluster, else why not."""
    for tool in ("ceph-mon", "ceph-osd", "ceph-mgr", "radosgw", "ceph", "ceph-authtool", "monmaptool",
                 "radosgw-admin"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs Ceph)"
    try:
        import rados  # noqa: F401
    except ImportError:
        return "python3-rados is not importable"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf_text(d: str, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{mon_port}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = {d}/keyring
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
mon_cluster_log_file = {d}/log/ceph.$channel.log
crash_dir = {d}/crash
mon_data = {d}/mon.$id
mgr_data = {d}/mgr.$id
osd_data = {d}/osd.$id
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_max_pg_per_osd = 1000
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
paxos_propose_interval = 0.05
mgr_initial_modules =
mgr_disabled_modules = {MGR_DISABLED}
mgr_stats_period = 1
mgr_tick_period = 1
log_to_stderr = false
err_to_stderr = false
[osd]
osd_objectstore = memstore
memstore_device_bytes = 8589934592
osd_memory_target = 939524096
[client.rgw.x]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_thread_pool_size = 64
rgw_gc_obj_min_wait = 10
rgw_gc_processor_period = 10
rgw_enable_lc_threads = false
rgw_dns_name = localhost
ms_mon_client_mode = crc
"""


def _run(args: list[str], env: dict, what: str, timeout: float = 60) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ClusterError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _start(d: str, name: str, args: list[str], env: dict) -> None:
    """A foreground daemon in its own session; its pid recorded for stop()."""
    with open(f"{d}/log/{name}.out", "ab") as out:
        proc = subprocess.Popen([*args, "-f"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with open(f"{d}/run/{name}.pid", "w") as f:
        f.write(str(proc.pid))


def start(directory: str, timeout: float = 120) -> Cluster:
    """Start a cluster in `directory` (which must not exist; keep the path short: admin sockets live
    in it and must stay under 108 bytes). Raises ClusterError, after stopping what was started."""
    d = os.path.abspath(directory)
    if os.path.exists(d):
        raise ClusterError(f"{d} exists: stop that cluster first")
    if len(f"{d}/run/client.rgw.x.123456.12345678.asok") > 107:
        raise ClusterError(f"{d}: path too long for Ceph's admin sockets")
    for sub in ("run", "log", "mon.a", "mgr.x", "osd.0", "crash"):
        os.makedirs(f"{d}/{sub}")
    mon_port, rgw_port = _free_port(), _free_port()
    conf = f"{d}/ceph.conf"
    with open(conf, "w") as f:
        f.write(_conf_text(d, str(uuid.uuid4()), mon_port, rgw_port))
    env = dict(os.environ, CEPH_CONF=conf, CEPH_ARGS=f"--conf {conf}")
    try:
        _bootstrap(d, conf, env, mon_port, rgw_port, timeout)
    except BaseException:
        stop(d, keep=True)
        raise
    return Cluster(d, conf, f"http://127.0.0.1:{rgw_port}")


def _bootstrap(d: str, conf: str, env: dict, mon_port: int, rgw_port: int, timeout: float) -> None:
    k = f"{d}/keyring"
    fsid = next(line.split("= ")[1] for line in open(conf) if line.startswith("fsid"))
    keys = [(["--create-keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]),
            (["--gen-key", "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
              "--cap", "mgr", "allow *", "--cap", "mds", "allow *"]),
            (["--gen-key", "-n", "mgr.x", "--cap", "mon", "allow profile mgr", "--cap", "osd", "allow *",
              "--cap", "mds", "allow *"]),
            (["--gen-key", "-n", "osd.0", "--cap", "mon", "allow profile osd", "--cap", "mgr",
              "allow profile osd", "--cap", "osd", "allow *"]),
            (["--gen-key", "-n", "client.rgw.x", "--cap", "mon", "allow rw", "--cap", "osd", "allow rwx",
              "--cap", "mgr", "allow rw"])]
    for args in keys:
        _run(["ceph-authtool", k, *args], env, "ceph-authtool")
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
          f"{d}/monmap"], env, "monmaptool")
    _run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", f"{d}/monmap", "--keyring", k], env, "ceph-mon --mkfs")
    _start(d, "mon.a", ["ceph-mon", "-i", "a"], env)
    osd_uuid = str(uuid.uuid4())
    _run(["ceph", "--connect-timeout", "30", "osd", "new", osd_uuid, "0"], env, "ceph osd new")
    _run(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], env, "ceph-osd --mkfs")
    _start(d, "osd.0", ["ceph-osd", "-i", "0"], env)
    _start(d, "mgr.x", ["ceph-mgr", "-i", "x"], env)
    _run(["ceph", "osd", "pool", "create", RBD_POOL, "8", "8"], env, "pool create")
    _run(["ceph", "osd", "pool", "application", "enable", RBD_POOL, "rbd"], env, "pool application")
    _start(d, "rgw.x", ["radosgw", "-n", "client.rgw.x"], env)
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{rgw_port}/"
    while True:  # radosgw answers HTTP
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise ClusterError(f"radosgw not answering on {url}; see {d}/log") from None
            time.sleep(0.1)
    _run(["radosgw-admin", "user", "create", "--uid=imgkit-test", "--display-name=imgkit-test",
          f"--access-key={S3_KEY}", f"--secret={S3_SECRET}"], env, "radosgw-admin user create")
    _wait_healthy(conf, deadline)


def _wait_healthy(conf: str, deadline: float) -> None:
    import rados
    c = rados.Rados(conffile=conf)
    c.connect(timeout=30)
    try:
        while True:
            s = json.loads(c.mon_command('{"prefix": "status", "format": "json"}', b"")[1])
            pg = s["pgmap"]
            clean = sum(x["count"] for x in pg.get("pgs_by_state", []) if x["state_name"] == "active+clean")
            if (s["health"]["status"] == "HEALTH_OK" and s["osdmap"]["num_up_osds"] == 1
                    and s["mgrmap"]["available"] and pg["num_pgs"] > 0 and clean == pg["num_pgs"]):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not healthy: {s['health']}")
            time.sleep(0.1)
    finally:
        c.shutdown()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ours(pid: int, conf: str) -> bool:
    """Only a daemon this module started for this directory is ever signalled."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"CEPH_CONF={conf}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _stop_daemons(d: str, names: tuple[str, ...], sig: int, grace: float) -> None:
    pids = []
    for name in names:
        try:
            pid = int(open(f"{d}/run/{name}.pid").read())
        except (OSError, ValueError):
            continue
        if _alive(pid) and _ours(pid, f"{d}/ceph.conf"):
            os.kill(pid, sig)
            pids.append(pid)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    for p in pids:
        try:
            os.waitpid(p, 0)  # our child when started by this process: reap it
        except ChildProcessError:
            while _alive(p):
                time.sleep(0.05)


def stop(directory: str, keep: bool = False) -> None:
    """Stop the cluster's daemons (by recorded pid only) and delete its directory (`keep`: leave the
    directory, e.g. for its logs)."""
    d = os.path.abspath(directory)
    if not os.path.isdir(f"{d}/run"):
        return
    _stop_daemons(d, ("rgw.x", "mgr.x"), signal.SIGTERM, 3)  # clients first: they need OSD and mon
    _stop_daemons(d, ("osd.0",), signal.SIGKILL, 1)
    _stop_daemons(d, ("mon.a",), signal.SIGTERM, 3)
    if not keep:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m imgkit.testing.ceph_cluster up|down DIR", file=sys.stderr)
        return 2
    if argv[0] == "down":
        stop(argv[1], keep=os.environ.get("KEEP") == "1")
        return 0
    why = available()
    if why:
        print(f"ceph_cluster: {why}", file=sys.stderr)
        return 1
    try:
        cluster = start(argv[1])
    except ClusterError as e:
        print(f"ceph_cluster: {e}", file=sys.stderr)
        return 1
    for k, v in cluster.env().items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
