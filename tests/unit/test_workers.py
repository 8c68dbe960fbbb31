"""Workers publish what they really serve; the API lists and checks only live ones (SQLite, as embedded)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory, transaction
from app.errors import ValidationFailedError
from app.migrate import upgrade
from app.models import Worker, utcnow
from app.routes.system import capabilities_document
from app.services import jobs, workers
from worker import devices
from worker.engine import registry
from worker.presence import Presence

CPU = {"name": "Test CPU @ 3 GHz", "flags": ["avx2", "avx512_vnni"], "logical_cores": 8, "machine": "x86_64"}
GPU = {"name": "NVIDIA Test GPU", "count": 1, "memory_mb": 81920, "capability": "9.0"}


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def _register(factory: sessionmaker[Session], hostname: str, queues: list[str], have: dict,
              age_s: float = 0.0) -> None:
    with transaction(factory) as session:
        workers.register(session, hostname, queues=queues, devices=have,
                         capabilities=devices.capabilities(devices.served(queues, have)))
        session.execute(update(Worker).where(Worker.hostname == hostname)
                        .values(last_seen=utcnow() - timedelta(seconds=age_s)))


def _live(factory: sessionmaker[Session]) -> list[Worker]:
    with factory() as session:
        return workers.live(session, ttl_s=10)


def test_capabilities_list_the_devices_of_live_workers_only(factory: sessionmaker[Session]) -> None:
    _register(factory, "cpu-1@a", ["cpu"], {"cpu": CPU})
    _register(factory, "cpu-2@b", ["cpu"], {"cpu": CPU})
    _register(factory, "gpu-1@c", ["gpu"], {"cpu": CPU, "cuda": GPU}, age_s=60)  # stale: stopped refreshing
    doc = capabilities_document(_live(factory))
    assert doc["served_devices"] == ["cpu"]
    (cpu,) = doc["live_devices"]
    assert cpu["device"] == "cpu" and cpu["queue"] == "cpu" and cpu["workers"] == 2
    assert cpu["name"] == CPU["name"] and cpu["flags"] == ["avx2", "avx512_vnni"]
    assert "onnx/dynamic" in cpu["methods"] and cpu["details"]["logical_cores"] == 8
    assert doc["devices"] == registry.devices()  # the registry's static view, whatever workers are up


def test_a_gpu_worker_serves_cuda_but_not_cpu_unless_it_consumes_the_cpu_queue(factory: sessionmaker[Session]) -> None:
    _register(factory, "gpu-1@c", ["gpu"], {"cpu": CPU, "cuda": GPU})
    (worker,) = _live(factory)
    assert workers.served_by(worker) == ["cuda"]
    (cuda,) = capabilities_document([worker])["live_devices"]
    assert cuda["name"] == GPU["name"] and cuda["queue"] == "gpu" and cuda["details"]["memory_mb"] == 81920


def _check(factory: sessionmaker[Session], device: str) -> None:
    live = _live(factory)
    jobs._check_device_served(device, sorted({d for w in live for d in workers.served_by(w)}), any_live=bool(live))


def test_a_device_no_live_worker_serves_is_422_naming_the_served_ones(factory: sessionmaker[Session]) -> None:
    _register(factory, "cpu-1@a", ["cpu"], {"cpu": CPU})
    _register(factory, "gpu-1@c", ["gpu"], {"cpu": CPU, "cuda": GPU}, age_s=60)
    _check(factory, "cpu")
    with pytest.raises(ValidationFailedError) as refused:
        _check(factory, "cuda")
    assert refused.value.detail == "no live worker serves device 'cuda'; served: cpu"
    assert refused.value.errors[0]["loc"] == ["body", "device"]


def test_with_no_live_worker_at_all_cpu_jobs_wait_and_others_are_refused(factory: sessionmaker[Session]) -> None:
    _check(factory, "cpu")  # start-up of `quantserve serve`: the worker has not published yet
    with pytest.raises(ValidationFailedError, match="served: none"):
        _check(factory, "cuda")
    _register(factory, "gpu-1@c", ["gpu"], {"cpu": CPU, "cuda": GPU})
    _check(factory, "cuda")
    with pytest.raises(ValidationFailedError, match="no live worker serves device 'cpu'; served: cuda"):
        _check(factory, "cpu")  # some worker is live, and none of them takes cpu jobs


def test_presence_registers_refreshes_re_registers_and_leaves(factory: sessionmaker[Session]) -> None:
    presence = Presence("w@h", ["cpu"], {"cpu": CPU}, {"cpu": ["onnx/dynamic"]})
    presence.beat(factory)  # first beat: no row yet, so it registers
    with factory() as session:
        first = session.get(Worker, "w@h")
        assert first is not None and first.queues == ["cpu"] and first.devices == {"cpu": CPU}
    with transaction(factory) as session:
        session.execute(update(Worker).values(last_seen=utcnow() - timedelta(hours=1)))
    assert _live(factory) == []
    presence.beat(factory)
    assert [w.hostname for w in _live(factory)] == ["w@h"]
    with transaction(factory) as session:
        workers.remove(session, "w@h")  # pruned, or the database was restored: the next beat registers again
    presence.beat(factory)
    assert [w.hostname for w in _live(factory)] == ["w@h"]
    presence.stopping.set()  # warm shutdown: the next beat removes the row
    presence.beat(factory)
    with factory() as session:
        assert session.scalars(select(Worker)).all() == []


def test_rows_of_workers_gone_for_long_are_pruned(factory: sessionmaker[Session]) -> None:
    _register(factory, "old@a", ["cpu"], {"cpu": CPU}, age_s=3 * 86400)
    _register(factory, "new@b", ["cpu"], {"cpu": CPU})
    with transaction(factory) as session:
        assert workers.prune(session, 86400) == 1
    with factory() as session:
        assert [w.hostname for w in session.scalars(select(Worker))] == ["new@b"]


def test_a_worker_without_cuda_does_not_consume_the_gpu_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "probe_cuda", lambda: {"available": False, "why": "no GPU in this test"})
    devices.detect.cache_clear()
    try:
        queues, dropped = devices.usable_queues(["cpu", "gpu"])
        assert queues == ["cpu"] and "no cuda device" in dropped["gpu"]
        monkeypatch.setattr(devices, "probe_cuda", lambda: {"available": True, **GPU})
        devices.detect.cache_clear()
        assert devices.usable_queues(["cpu", "gpu"]) == (["cpu", "gpu"], {})
        assert devices.detect(True)["cuda"]["name"] == GPU["name"]
    finally:
        devices.detect.cache_clear()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni "
                       "amx_tile amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert devices.cpu_flags(cpuinfo) == ["amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512f", "fma"]
    assert devices.cpu_flags(tmp_path / "missing") == []


def test_a_worker_publishes_the_registry_pairs_of_each_device_it_serves() -> None:
    from worker.engine.registry import SPECS

    caps = devices.capabilities(["cpu", "cuda"])
    for device in ("cpu", "cuda"):
        assert caps[device] == sorted(f"{s.format.value}/{s.method.value}" for s in SPECS.values()
                                      if device in {d.value for d in s.devices})
    assert "onnx/dynamic" in caps["cpu"]
