"""Runs wrk with a Lua script that counts answers by status, and returns rps, p50, p99 and every error kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# wrk's own summary only says "Non-2xx or 3xx responses"; this script keeps each status apart.
LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do counts[k] = (counts[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%d": %d', k, v)) end
  io.write(string.format('QS_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout, table.concat(parts, ", ")))
end
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    socket_errors: dict[str, int] = field(default_factory=dict)

    def errors(self, ok: tuple[int, ...] = (200, 304)) -> dict[str, int]:
        """Every answer that is not `ok`, by status, and every socket error, by kind."""
        bad = {str(s): n for s, n in sorted(self.statuses.items()) if s not in ok}
        bad.update({k: n for k, n in self.socket_errors.items() if n})
        return bad


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        print("make bench-api needs wrk, the HTTP load generator, and it is not installed.\n"
              "Install it with: apt-get install -y wrk   (Debian/Ubuntu package 'wrk')", file=sys.stderr)
        raise SystemExit(2)
    return path


def run(url: str, connections: int, duration_s: float, headers: dict[str, str] | None = None) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(LUA)
        script = fh.name
    threads = min(2, connections)
    seconds = max(1, round(duration_s))  # wrk takes whole seconds
    cmd = [require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    try:
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration_s + 60)
    finally:
        Path(script).unlink(missing_ok=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("QS_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("QS_RESULT "))
    return Result(rps=data["requests"] / (data["duration_us"] / 1e6), p50_ms=data["p50_us"] / 1000,
                  p99_ms=data["p99_us"] / 1000, statuses={int(k): v for k, v in data["statuses"].items()},
                  socket_errors={k: data[k] for k in ("connect", "read", "write", "timeout")})
