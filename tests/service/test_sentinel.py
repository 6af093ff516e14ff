"""Redis Sentinel: the API and a real worker on ``redis+sentinel://`` against real processes on loopback (a primary,
a replica and three Sentinels, the redis-server binary of service.redis_server run as ``--sentinel``). The primary
is killed (SIGKILL) while a job runs: the Sentinels promote the replica, both processes follow it, the running job
finishes or is retried, and every job the API accepted is still there and succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.queue import JobStore, StoreUnavailable, connect
from service.redis_server import die_with_parent, find_redis_server, free_port
from service.redis_url import parse_sentinel_url
from service.settings import Settings
from service.worker_session import WorkerSession
from tests.service.conftest import ApiServer, WorkerProcess

SERVICE = "mymaster"
TERMINAL = {"succeeded", "failed", "canceled"}


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


@dataclass
class SentinelCluster:
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    procs: dict[str, subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinel_ports)}/{SERVICE}/0"

    def primary(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        try:
            return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])
        finally:
            client.close()


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    binary = find_redis_server()
    primary, replica = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--loglevel", "warning"]
    procs = {"primary": _start([binary, "--port", str(primary), "--dir", str(_dir(tmp_path, "p")), *common],
                               tmp_path / "primary.log")}
    procs["replica"] = _start([binary, "--port", str(replica), "--dir", str(_dir(tmp_path, "r")), *common,
                               "--replicaof", "127.0.0.1", str(primary)], tmp_path / "replica.log")
    sentinels = [free_port() for _ in range(3)]
    for i, port in enumerate(sentinels):
        conf = _dir(tmp_path, f"s{i}") / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 10000\n")
        procs[f"sentinel{i}"] = _start([binary, str(conf), "--sentinel"], tmp_path / f"sentinel{i}.log")
    cluster = SentinelCluster(primary, replica, sentinels, procs)
    try:
        replica_client = redis.Redis(port=replica, socket_timeout=1)
        _wait(lambda: replica_client.info("replication")["master_link_status"] == "up", 30, "replica never synced")
        for port in sentinels:  # every Sentinel knows the replica and the other two Sentinels
            client = redis.Redis(port=port, socket_timeout=1)
            _wait(lambda c=client: c.sentinel_master(SERVICE)["num-other-sentinels"] == 2
                  and c.sentinel_slaves(SERVICE), 30, f"Sentinel {port} never saw its peers")
        yield cluster
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _dir(root: Path, name: str) -> Path:
    (root / name).mkdir()
    return root / name


def test_a_sentinel_url_parses_into_sentinels_service_and_db() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:s%40cret@h1:26379,h2,[::1]:26380/mymaster/2")
    assert parsed.sentinels == (("h1", 26379), ("h2", 26379), ("::1", 26380))
    assert (parsed.service_name, parsed.db, parsed.password, parsed.ssl) == ("mymaster", 2, "s@cret", False)
    assert parse_sentinel_url("rediss+sentinel://h:1/svc").ssl
    for bad in ("redis+sentinel://h:1", "redis+sentinel:///svc", "redis+sentinel://h:x/svc",
                "redis+sentinel://:hunter2@h:1/svc/zero"):
        with pytest.raises(ValueError) as refused:
            parse_sentinel_url(bad)
        assert "hunter2" not in str(refused.value)


@pytest.mark.timeout(420)  # 10-20 s usually; 2-4 min when the kill strands a job being claimed
def test_jobs_survive_the_loss_of_the_primary(sentinel_cluster: SentinelCluster, tiny_checkpoint: Path,
                                              tmp_path: Path) -> None:
    url = sentinel_cluster.url
    api = ApiServer(Settings(redis_url=url, checkpoints={"tiny": str(tiny_checkpoint)})).start()
    args = ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "service.cli", "worker", "--redis-url", url,
            "--checkpoint", f"tiny={tiny_checkpoint}", "--device", "cpu", "--metrics-port", "0",
            "--name", "sentinel-worker", "--lease-seconds", "5"]
    worker = WorkerProcess(args, 0, "sentinel-worker", tmp_path / "worker.log")
    try:
        worker.wait_ready(f"redis://127.0.0.1:{sentinel_cluster.primary_port}/0")
        with httpx.Client(base_url=api.url, timeout=10) as http:
            accepted = []
            for seed in range(6):
                response = http.post("/generate", json={"num_images": 16, "seed": seed, "preview_every": 1})
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
            _wait(lambda: http.get(f"/jobs/{accepted[0]}").json()["status"] == "running", 60, "no job ran")
            running = [j for j in accepted if http.get(f"/jobs/{j}").json()["status"] == "running"]

            sentinel_cluster.procs["primary"].send_signal(signal.SIGKILL)  # mid-job
            _wait(lambda: sentinel_cluster.primary() == sentinel_cluster.replica_port, 60, "no failover")

            def all_ended() -> bool:
                response = http.get("/jobs/" + accepted[-1])
                return response.status_code == 200 and all(
                    http.get(f"/jobs/{j}").json()["status"] in TERMINAL for j in accepted)

            # A job the worker was taking from the queue as the primary died is stranded in RQ's intermediate
            # queue; worker maintenance retries it after a minute or two (WorkerSession.maintain).
            try:
                _wait(all_ended, 240, "jobs did not finish after the failover")
            finally:
                jobs = {j: http.get(f"/jobs/{j}").json() for j in accepted}
        assert running, "the primary was to be killed while a job ran"
        statuses = {j: v["status"] for j, v in jobs.items()}
        assert statuses == dict.fromkeys(accepted, "succeeded"), worker.log_path.read_text()
        for job_id, job in jobs.items():
            assert len(job["images"]) == 16, job_id
        client = connect(url)
        assert int(client.info("server")["tcp_port"]) == sentinel_cluster.replica_port, "the client follows"
        client.close()
    finally:
        worker.stop()
        api.stop()


def test_a_maintenance_lock_lost_in_a_failover_expires_before_the_next_run(redis_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A failover between taking the maintenance lock and releasing it leaves the lock on the promoted replica:
    it must not outlive the maintenance interval, or stranded jobs wait that long to be retried."""
    store = JobStore(connect(redis_url), queue_name="ddpm")
    session = WorkerSession(redis_url, store, "lock-test", maintenance_seconds=30)
    session.register()
    queue = session.rq_worker.queues[0]
    real_delete = session.rq_worker.connection.delete

    def failover(*keys: str) -> int:
        if queue.registry_cleaning_key in keys:
            raise redis.ConnectionError("the primary went away")
        return int(real_delete(*keys))

    monkeypatch.setattr(session.rq_worker.connection, "delete", failover)
    with pytest.raises(StoreUnavailable):
        session.maintain()
    ttl = redis.Redis.from_url(redis_url).ttl(queue.registry_cleaning_key)
    assert 0 < ttl <= 30, f"a left-behind maintenance lock lives {ttl} s"
